"""Tests of the toy world: determinism, masks, captions, splits, edit pairs and the classifier."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from toyworld import classifier, scenes

N_CLASSIFIER_SCENES = 300
N_PAIRS_PER_KIND = 15


def _words(caption):
    return caption.split()


def _degrade(image, rng, blur_radius=1.0, noise_sigma=8.0):
    """Slight Gaussian blur, then additive Gaussian noise, as a generated image might show."""
    blurred = np.asarray(
        Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur_radius)), dtype=np.float64
    )
    return np.clip(np.rint(blurred + rng.normal(0.0, noise_sigma, blurred.shape)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def rendered_scenes():
    """(scene, image, masks) for seeds 0 .. N_CLASSIFIER_SCENES - 1."""
    result = []
    for seed in range(N_CLASSIFIER_SCENES):
        scene = scenes.sample_scene(seed)
        image, masks = scenes.render(scene)
        result.append((scene, image, masks))
    return result


# ----------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_gives_identical_scenes_images_and_masks():
    for seed in (0, 1, 12345):
        first, second = scenes.sample_scene(seed), scenes.sample_scene(seed)
        assert first == second
        image_a, masks_a = scenes.render(first)
        image_b, masks_b = scenes.render(second)
        assert image_a.tobytes() == image_b.tobytes()
        assert len(masks_a) == len(masks_b)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(masks_a, masks_b))
    assert scenes.make_dataset(7, 40) == scenes.make_dataset(7, 40)
    assert scenes.make_dataset(7, 40, "test") == scenes.make_dataset(7, 40, "test")


def test_dataset_prefix_is_stable():
    assert scenes.make_dataset(3, 10) == scenes.make_dataset(3, 25)[:10]


def test_different_seeds_give_different_scenes():
    captions = {scenes.sample_scene(seed).caption for seed in range(50)}
    assert len(captions) > 40
    image_0, _ = scenes.render(scenes.sample_scene(0))
    image_1, _ = scenes.render(scenes.sample_scene(1))
    assert image_0.tobytes() != image_1.tobytes()
    assert scenes.make_dataset(0, 20) != scenes.make_dataset(1, 20)


def test_edit_pairs_are_deterministic():
    first, second = scenes.make_edit_pairs(5, 2), scenes.make_edit_pairs(5, 2)
    assert len(first) == 2 * len(scenes.EDIT_KINDS)
    for a, b in zip(first, second):
        assert (a.kind, a.source, a.target) == (b.kind, b.source, b.target)
        assert (a.source_word, a.target_word, a.edited_object_index) == (
            b.source_word,
            b.target_word,
            b.edited_object_index,
        )
        assert a.edit_mask.tobytes() == b.edit_mask.tobytes()
    # Pairs have their own streams, so asking for more does not change the first ones.
    longer = scenes.make_edit_pairs(5, 3)
    assert [p.target for p in longer[:2]] == [p.target for p in first[:2]]


# ----------------------------------------------------------------------------------------------
# Rendering and masks


def test_masks_are_exact_inside_and_disjoint(rendered_scenes):
    margin = scenes.BORDER_MARGIN - 1  # anti-aliasing may reach one pixel beyond the geometry
    for scene, image, masks in rendered_scenes:
        assert image.dtype == np.uint8 and image.shape == (128, 128, 3)
        assert len(masks) == len(scene.objects)
        background_pixels = np.ones((128, 128), dtype=bool)
        for obj, mask in zip(scene.objects, masks):
            assert mask.dtype == bool and mask.shape == (128, 128)
            assert mask.any()
            assert not mask[:margin].any() and not mask[-margin:].any()
            assert not mask[:, :margin].any() and not mask[:, -margin:].any()
            # The mask's area is the shape's nominal area, give or take the pixelised edge.
            nominal_area = scenes.shape_area_factor(obj.shape) * obj.r**2
            assert abs(mask.sum() / nominal_area - 1) < 0.08, (scene.caption, obj)
            # The object's own colour fills (almost all of) the mask exactly.
            exact = np.all(image[mask] == scenes.COLOURS[obj.colour], axis=1)
            assert exact.mean() > 0.75, (scene.caption, obj, exact.mean())
            background_pixels &= ~scenes.dilate(mask, 1)
        if len(masks) == 2:
            assert not (scenes.dilate(masks[0], 2) & scenes.dilate(masks[1], 2)).any()
        assert np.all(image[background_pixels] == scenes.BACKGROUNDS[scene.background])


def test_render_at_other_sizes():
    scene = scenes.sample_scene(11, n_objects=2)
    for size in (64, 256):
        image, masks = scenes.render(scene, size)
        assert image.shape == (size, size, 3)
        assert all(mask.shape == (size, size) and mask.any() for mask in masks)
        assert classifier.scene_attribute_accuracy(scene, image) == 1.0


def test_two_objects_sit_in_their_halves_and_lone_objects_anywhere():
    lone_positions = set()
    for seed in range(200):
        scene = scenes.sample_scene(seed)
        if len(scene.objects) == 2:
            left, right = scene.objects
            assert (left.position, right.position) == ("left", "right")
            assert left.cx + left.r <= 64 - scenes.MIDLINE_GAP
            assert right.cx - right.r >= 64 + scenes.MIDLINE_GAP
        else:
            lone_positions.add(scene.objects[0].position)
    assert lone_positions == {"left", "center", "right"}
    assert all(scenes.sample_scene(s, 1, "center").objects[0].position == "center" for s in range(10))


def test_invalid_scenes_are_rejected():
    with pytest.raises(ValueError):
        scenes.ObjectSpec("hexagon", "red", "small", "center", 64, 64, 14)
    with pytest.raises(ValueError):
        scenes.ObjectSpec("circle", "red", "small", "center", 64, 64, 24)  # r does not match size
    with pytest.raises(ValueError):
        scenes.ObjectSpec("circle", "red", "large", "left", 10, 64, 24)  # off the canvas
    left = scenes.ObjectSpec("circle", "red", "large", "left", 50, 64, 24)
    right = scenes.ObjectSpec("square", "blue", "large", "right", 80, 64, 24)
    with pytest.raises(ValueError):
        scenes.Scene("white", (left, right))  # overlapping boxes
    with pytest.raises(ValueError):
        scenes.Scene("pink", (right,))


# ----------------------------------------------------------------------------------------------
# Captions and the held-out split


def test_caption_format():
    red_circle = scenes.ObjectSpec("circle", "red", "large", "center", 64, 64, 24)
    assert (
        scenes.Scene("white", (red_circle,)).caption
        == "a large red circle in the center on a white background"
    )
    blue_square = scenes.ObjectSpec("square", "blue", "small", "left", 30, 64, 14)
    green_triangle = scenes.ObjectSpec("triangle", "green", "large", "right", 95, 64, 24)
    # Objects are stored, and captioned, left to right whatever order they are given in.
    scene = scenes.Scene("gray", (green_triangle, blue_square))
    assert scene.objects == (blue_square, green_triangle)
    assert scene.caption == (
        "a small blue square on the left and a large green triangle on the right on a gray background"
    )


def test_captions_name_every_attribute():
    for scene in scenes.make_dataset(0, 200):
        words = _words(scene.caption)
        assert scene.background in words
        assert scene.caption == scenes.make_caption(scene.background, scene.objects)
        for obj in scene.objects:
            for word in (obj.shape, obj.colour, obj.size, obj.position):
                assert word in words, (word, scene.caption)
            assert obj.phrase in scene.caption


def test_held_out_split_is_disjoint_from_train():
    train = scenes.make_dataset(0, 2000, "train")
    test = scenes.make_dataset(0, 300, "test")
    assert all(scenes.caption_split(s.caption) == "train" for s in train)
    assert all(scenes.caption_split(s.caption) == "test" for s in test)
    assert not {s.caption for s in train} & {s.caption for s in test}
    # Test is about one caption in TEST_SPLIT_MODULUS and still covers every attribute value.
    test_share = np.mean(
        [scenes.caption_split(scenes.sample_scene(s).caption) == "test" for s in range(3000)]
    )
    assert 0.06 < test_share < 0.14
    test_words = {word for s in test for word in _words(s.caption)}
    for names in (scenes.SHAPES, scenes.COLOURS, scenes.SIZES, scenes.POSITIONS, scenes.BACKGROUNDS):
        assert set(names) <= test_words


# ----------------------------------------------------------------------------------------------
# Edit pairs


def _unchanged(obj, new, fields):
    return all(getattr(obj, f) == getattr(new, f) for f in fields)


@pytest.mark.parametrize("kind", scenes.EDIT_KINDS)
def test_edit_pairs(kind):
    geometry = ("position", "cx", "cy", "r", "size")
    for pair in scenes.make_edit_pairs(21, N_PAIRS_PER_KIND, kinds=(kind,)):
        source, target = pair.source, pair.target
        assert pair.kind == kind
        assert pair.source_caption == source.caption and pair.target_caption == target.caption
        assert source.caption != target.caption

        if kind in ("recolour", "reshape", "replace"):
            index = pair.edited_object_index
            assert len(source.objects) == len(target.objects)
            assert source.background == target.background
            old, new = source.objects[index], target.objects[index]
            assert _unchanged(old, new, geometry)
            assert (old.colour != new.colour) == (kind in ("recolour", "replace"))
            assert (old.shape != new.shape) == (kind in ("reshape", "replace"))
            others = [i for i in range(len(source.objects)) if i != index]
            assert all(source.objects[i] == target.objects[i] for i in others)
        elif kind == "add":
            assert len(source.objects) == 1 and len(target.objects) == 2
            assert source.background == target.background
            kept = source.objects[0]
            assert kept.position in ("left", "right")
            assert kept in target.objects
            assert target.objects[pair.edited_object_index] != kept
        elif kind == "remove":
            assert len(source.objects) == 2 and len(target.objects) == 1
            assert pair.edited_object_index is None
            assert source.background == target.background
            assert target.objects[0] in source.objects
        else:
            assert pair.edited_object_index is None
            assert source.objects == target.objects
            assert source.background != target.background

        # The changed span occurs exactly once in each caption; word swaps are aligned word by word.
        for caption, word in (
            (pair.source_caption, pair.source_word),
            (pair.target_caption, pair.target_word),
        ):
            if word:
                assert f" {caption} ".count(f" {word} ") == 1, (caption, word)
        if kind in ("recolour", "reshape", "replace", "background"):
            assert pair.source_caption.replace(pair.source_word, pair.target_word) == pair.target_caption
            assert len(_words(pair.source_caption)) == len(_words(pair.target_caption))
        elif kind == "add":
            assert (
                pair.source_word == "" and pair.target_word == target.objects[pair.edited_object_index].phrase
            )
        else:
            assert pair.target_word == "" and pair.source_word in {o.phrase for o in source.objects}

        # Pixels outside the edit mask are bit-identical; inside, something changes.
        source_image, _ = scenes.render(source)
        target_image, _ = scenes.render(target)
        changed = np.any(source_image != target_image, axis=-1)
        assert pair.edit_mask.dtype == bool and pair.edit_mask.shape == (128, 128)
        assert not changed[~pair.edit_mask].any(), (kind, source.caption, target.caption)
        assert changed[pair.edit_mask].any()
        # The mask is not needlessly large: almost all of it changes for background edits, and for
        # object edits it stays within the edited object's box grown by the dilation (plus one
        # pixel of anti-aliasing).
        if kind == "background":
            assert changed[pair.edit_mask].mean() > 0.99
        else:
            edited = (
                target.objects[pair.edited_object_index]
                if kind != "remove"
                else ((set(source.objects) - set(target.objects)).pop())
            )
            grow = edited.r + scenes.EDIT_MASK_DILATION + 1
            box = np.zeros((128, 128), dtype=bool)
            box[edited.cy - grow : edited.cy + grow, edited.cx - grow : edited.cx + grow] = True
            assert not (pair.edit_mask & ~box).any()


def test_edit_pairs_respect_the_split():
    for pair in scenes.make_edit_pairs(2, 2, split="test"):
        assert scenes.caption_split(pair.source_caption) == "test"
        assert scenes.caption_split(pair.target_caption) == "test"


# ----------------------------------------------------------------------------------------------
# Classifier


def _assert_recovers_every_attribute(scene, image, check_classify=True):
    report = classifier.scene_attribute_report(scene, image)
    assert report["n_detected"] == len(scene.objects), (scene.caption, classifier.classify(image))
    assert report["accuracy"] == 1.0, (scene.caption, report, classifier.classify(image))
    if not check_classify:  # the report alone covers every attribute; classify costs as much again
        return
    result = classifier.classify(image)
    assert result["background"] == scene.background
    # classify lists objects left to right, the same order as the scene.
    for obj, detected in zip(scene.objects, result["objects"]):
        assert all(classifier.object_matches(obj, detected).values())


def test_classifier_is_exact_on_rendered_scenes(rendered_scenes):
    for scene, image, _ in rendered_scenes:
        _assert_recovers_every_attribute(scene, image)


def test_classifier_tolerates_noise_and_blur(rendered_scenes):
    rng = np.random.default_rng(0)
    for scene, image, _ in rendered_scenes:
        _assert_recovers_every_attribute(scene, _degrade(image, rng), check_classify=False)


def test_classifier_masks_match_ground_truth(rendered_scenes):
    for scene, image, masks in rendered_scenes[:50]:
        detections = classifier.find_objects(image)
        for mask, detected in zip(masks, detections):
            overlap = (mask & detected.mask).sum() / (mask | detected.mask).sum()
            assert overlap > 0.95, (scene.caption, overlap)


def test_classifier_sees_every_background_and_no_object_on_a_blank_canvas():
    for name, colour in scenes.BACKGROUNDS.items():
        blank = np.empty((128, 128, 3), dtype=np.uint8)
        blank[:] = colour
        assert classifier.classify_background(blank) == name
        noisy = _degrade(blank, np.random.default_rng(1))
        assert classifier.classify(noisy) == {"background": name, "objects": []}


def test_accuracy_counts_only_the_wrong_attributes():
    pair = scenes.make_edit_pair(3, "recolour")
    target_image, _ = scenes.render(pair.target)
    report = classifier.scene_attribute_report(pair.source, target_image)
    n_objects = len(pair.source.objects)
    assert report["total"] == 1 + 4 * n_objects
    assert report["correct"] == report["total"] - 1
    assert report["objects"][pair.edited_object_index] == {
        "shape": True,
        "colour": False,
        "size": True,
        "position": True,
    }
    assert classifier.scene_attribute_accuracy(pair.source, target_image) == pytest.approx(
        1 - 1 / report["total"]
    )
    # A scene object with nothing to match gets all four attributes wrong.
    removal = scenes.make_edit_pair(4, "remove")
    removed_image, _ = scenes.render(removal.target)
    report = classifier.scene_attribute_report(removal.source, removed_image)
    assert report["correct"] == 5 and report["total"] == 9
