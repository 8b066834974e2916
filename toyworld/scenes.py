"""Scenes of one or two coloured shapes on a plain background, their captions, and edit pairs.

The world is deliberately small so that a tiny text-to-image model can learn it on a CPU and so
that every edit has exact ground truth:

* background: one of ``BACKGROUNDS`` (white, black, gray, beige), a flat colour;
* objects: one or two, each a ``SHAPES`` x ``COLOURS`` x ``SIZES`` combination, axis-aligned and
  never rotated, every shape filling the same ``2r x 2r`` box centred on ``(cx, cy)``;
* positions: two objects sit one in each half ("left", "right") with a gap around the midline, so
  they never touch; a lone object sits in the "center" or, as the source of "add" edits and the
  result of "remove" edits needs, in one of the halves.

Geometry (``cx``, ``cy``, ``r``) is stored in units of a 128-pixel canvas (``REFERENCE_SIZE``) and
scaled when rendering at another size, so a `Scene` does not depend on the resolution.

Rendering draws every object at ``SUPERSAMPLING`` times the resolution and box-filters it down,
giving anti-aliased edges; an object's ground-truth mask is its downsampled coverage >= 0.5.

Captions are built only from the attributes (`make_caption`), e.g.
``"a large red circle in the center on a white background"`` or
``"a small blue square on the left and a large green triangle on the right on a gray background"``.

Held-out split: a caption belongs to the "test" split when ``zlib.crc32(caption) % 10 == 0`` and
to "train" otherwise (`caption_split`). `make_dataset` draws each split from its own random
stream and keeps only scenes whose caption falls in the requested split, so the two splits share
no caption and no random stream; the test split measures generalisation to unseen combinations.

Everything is deterministic: the same integer seed gives the same scenes and byte-identical images.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

REFERENCE_SIZE = 128
"""Side in pixels of the canvas in which scene geometry is expressed."""

SUPERSAMPLING = 4
"""Objects are drawn at this many times the output resolution, then box-filtered down."""

SHAPES = ("circle", "square", "triangle", "cross")

# Saturated colours far apart in RGB and from every background, so that a nearest-colour rule
# recovers them even from noisy, blurred or slightly off-colour generated images.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 130, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "beige": (225, 205, 165),
}

SIZES: dict[str, int] = {"small": 14, "large": 24}
"""Half-extent ``r`` of each size, in reference pixels (the object fills a ``2r x 2r`` box)."""

POSITIONS = ("left", "center", "right")

EDIT_KINDS = ("recolour", "reshape", "replace", "add", "remove", "background")

SPLITS = ("train", "test")
TEST_SPLIT_MODULUS = 10
"""One caption in this many (by CRC-32) is held out for the test split."""

CROSS_ARM_HALF_WIDTH = 0.35
"""Half-width of a cross's arms as a fraction of ``r``: thin enough to tell apart from a square."""

BORDER_MARGIN = 3
"""Minimum distance, in reference pixels, between an object and the canvas edge."""

MIDLINE_GAP = 4
"""Minimum distance between a "left"/"right" object and the vertical midline (gap = 8 px)."""

CENTER_JITTER = 6
"""A "center" object's cx lies within this many reference pixels of the midline."""

VERTICAL_JITTER = 20
"""Every object's cy lies within this many reference pixels of the horizontal midline."""

EDIT_MASK_DILATION = 2
"""Object edit masks are dilated by this many pixels to cover anti-aliased edges."""

CENTER_PROBABILITY = 0.5
"""Chance that a lone object is placed in the center rather than in one of the halves."""


def shape_area_factor(shape: str) -> float:
    """Area of `shape` divided by ``r**2`` (its nominal pixel area is ``factor * r**2``)."""
    if shape == "circle":
        return math.pi
    if shape == "square":
        return 4.0
    if shape == "triangle":
        return 2.0  # base 2r, height 2r
    if shape == "cross":
        arm_width = 2.0 * CROSS_ARM_HALF_WIDTH
        return 2.0 * (2.0 * arm_width) - arm_width**2  # two 2r x 2hr bars minus their overlap
    raise ValueError(f"unknown shape {shape!r}")


def shape_hull_area_factor(shape: str) -> float:
    """Area of the convex hull of `shape` divided by ``r**2`` (equals the area except for a cross)."""
    if shape != "cross":
        return shape_area_factor(shape)
    corner_leg = 1.0 - CROSS_ARM_HALF_WIDTH  # the hull cuts a right isosceles triangle off each corner
    return 4.0 - 4.0 * 0.5 * corner_leg**2


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """One object: its attributes and its geometry in reference (128-px canvas) pixels.

    The object fills the box ``[cx - r, cx + r] x [cy - r, cy + r]``; ``r`` is ``SIZES[size]``.
    """

    shape: str
    colour: str
    size: str
    position: str
    cx: int
    cy: int
    r: int

    def __post_init__(self) -> None:
        _check_name("shape", self.shape, SHAPES)
        _check_name("colour", self.colour, COLOURS)
        _check_name("size", self.size, SIZES)
        _check_name("position", self.position, POSITIONS)
        if self.r != SIZES[self.size]:
            raise ValueError(f"r={self.r} does not match size {self.size!r} (r={SIZES[self.size]})")
        if not (BORDER_MARGIN <= self.cx - self.r and self.cx + self.r <= REFERENCE_SIZE - BORDER_MARGIN):
            raise ValueError(f"object at cx={self.cx} with r={self.r} leaves the canvas")
        if not (BORDER_MARGIN <= self.cy - self.r and self.cy + self.r <= REFERENCE_SIZE - BORDER_MARGIN):
            raise ValueError(f"object at cy={self.cy} with r={self.r} leaves the canvas")

    @property
    def phrase(self) -> str:
        """The caption fragment describing this object, e.g. "a large red circle on the left"."""
        return object_phrase(self)


@dataclasses.dataclass(frozen=True)
class Scene:
    """A background and one or two objects; `caption` is derived from them.

    Objects are stored left to right (by position, then cx), which is also their caption order.
    """

    background: str
    objects: tuple[ObjectSpec, ...]
    caption: str = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        _check_name("background", self.background, BACKGROUNDS)
        objects = tuple(sorted(self.objects, key=lambda o: (POSITIONS.index(o.position), o.cx)))
        if not 1 <= len(objects) <= 2:
            raise ValueError(f"a scene has 1 or 2 objects, got {len(objects)}")
        if len(objects) == 2:
            positions = tuple(o.position for o in objects)
            if positions != ("left", "right"):
                raise ValueError(f"two objects must be on the left and on the right, got {positions}")
            # Halves keep objects apart; check the boxes too in case geometry was given by hand.
            if objects[0].cx + objects[0].r + 2 * MIDLINE_GAP > objects[1].cx - objects[1].r:
                raise ValueError("the two objects are closer than the midline gap")
        object.__setattr__(self, "objects", objects)
        object.__setattr__(self, "caption", make_caption(self.background, objects))


@dataclasses.dataclass(frozen=True, eq=False)
class EditPair:
    """A source scene, the target scene after one edit, and what the edit may change.

    ``edit_mask`` (bool, ``size x size``) is the region that legitimately changes: for object edits
    the union of the edited object's masks in source and target, dilated by ``EDIT_MASK_DILATION``
    pixels; for "background" every pixel not fully covered by an object (edge pixels blend with the
    background, so they change too). Rendered source and target images are equal outside it.

    ``edited_object_index`` indexes ``target.objects`` (None for "remove" and "background").
    ``source_word``/``target_word`` are the span of the caption that changes, each occurring
    exactly once in its caption: a colour word ("recolour"), a shape word ("reshape"), a
    "colour shape" phrase ("replace"), a background word ("background"); for "add" the new
    object's phrase with ``source_word == ""``, for "remove" the removed object's phrase with
    ``target_word == ""``. For the word-swap kinds the target caption is the source caption with
    ``source_word`` replaced by ``target_word``.
    """

    kind: str
    source: Scene
    target: Scene
    edit_mask: np.ndarray
    edited_object_index: int | None
    source_word: str
    target_word: str
    size: int = REFERENCE_SIZE

    @property
    def source_caption(self) -> str:
        return self.source.caption

    @property
    def target_caption(self) -> str:
        return self.target.caption


# --------------------------------------------------------------------------------------------
# Captions and splits


def object_phrase(obj: ObjectSpec) -> str:
    """Caption fragment for one object: "a {size} {colour} {shape} {in the center|on the left|...}"."""
    where = "in the center" if obj.position == "center" else f"on the {obj.position}"
    return f"a {obj.size} {obj.colour} {obj.shape} {where}"


def make_caption(background: str, objects: Sequence[ObjectSpec]) -> str:
    """Caption of a scene: the object phrases joined by " and ", then "on a {background} background"."""
    return " and ".join(object_phrase(o) for o in objects) + f" on a {background} background"


def caption_split(caption: str) -> str:
    """The split ("train" or "test") a caption belongs to; stable across runs and platforms."""
    return "test" if zlib.crc32(caption.encode("utf-8")) % TEST_SPLIT_MODULUS == 0 else "train"


# --------------------------------------------------------------------------------------------
# Sampling


def as_rng(rng_or_seed: np.random.Generator | int | Sequence[int]) -> np.random.Generator:
    """A numpy Generator: the one given, or a fresh one seeded with the given int (or ints)."""
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    # Index into a Python sequence rather than rng.choice so that the result is a plain str.
    return options[int(rng.integers(len(options)))]


def _sample_center(rng: np.random.Generator, position: str, r: int) -> tuple[int, int]:
    middle = REFERENCE_SIZE // 2
    if position == "center":
        cx = middle + int(rng.integers(-CENTER_JITTER, CENTER_JITTER + 1))
    elif position == "left":
        cx = int(rng.integers(BORDER_MARGIN + r, middle - MIDLINE_GAP - r + 1))
    else:
        cx = int(rng.integers(middle + MIDLINE_GAP + r, REFERENCE_SIZE - BORDER_MARGIN - r + 1))
    cy = middle + int(rng.integers(-VERTICAL_JITTER, VERTICAL_JITTER + 1))
    return cx, cy


def sample_object(
    rng_or_seed: np.random.Generator | int,
    position: str,
    shape: str | None = None,
    colour: str | None = None,
    size: str | None = None,
) -> ObjectSpec:
    """A random object at `position`; attributes given as arguments are kept, the rest drawn."""
    rng = as_rng(rng_or_seed)
    shape = shape or _pick(rng, SHAPES)
    colour = colour or _pick(rng, tuple(COLOURS))
    size = size or _pick(rng, tuple(SIZES))
    r = SIZES[size]
    cx, cy = _sample_center(rng, position, r)
    return ObjectSpec(shape=shape, colour=colour, size=size, position=position, cx=cx, cy=cy, r=r)


def sample_scene(
    rng_or_seed: np.random.Generator | int,
    n_objects: int | None = None,
    single_position: str | None = None,
) -> Scene:
    """A random scene with `n_objects` (1 or 2; drawn with equal odds when None).

    Two objects go to the left and right halves. A lone object goes to `single_position`, or when
    that is None to the center with probability ``CENTER_PROBABILITY`` and otherwise to a random
    half (off-centre lone objects are the sources of "add" edits and the results of "remove").
    """
    rng = as_rng(rng_or_seed)
    if n_objects is None:
        n_objects = int(rng.integers(1, 3))
    background = _pick(rng, tuple(BACKGROUNDS))
    if n_objects == 2:
        positions: tuple[str, ...] = ("left", "right")
    elif n_objects == 1:
        if single_position is None:
            single_position = "center" if rng.random() < CENTER_PROBABILITY else _pick(rng, ("left", "right"))
        positions = (single_position,)
    else:
        raise ValueError(f"n_objects must be 1 or 2, got {n_objects}")
    return Scene(background, tuple(sample_object(rng, p) for p in positions))


_SPLIT_STREAM = {"train": 0, "test": 1}
_EDIT_STREAM = 2  # keeps edit-pair random streams apart from the dataset streams


def make_dataset(seed: int, n: int, split: str = "train") -> list[Scene]:
    """`n` scenes of `split`, deterministic in `seed` (a prefix of a longer dataset is the same).

    Each split is drawn from its own random stream (seeded with ``[seed, split id]``), and scenes
    whose caption belongs to the other split (see `caption_split`) are skipped, so train and test
    share neither captions nor random draws.
    """
    _check_name("split", split, SPLITS)
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    scenes: list[Scene] = []
    while len(scenes) < n:
        scene = sample_scene(rng)
        if caption_split(scene.caption) == split:
            scenes.append(scene)
    return scenes


# --------------------------------------------------------------------------------------------
# Rendering


def _draw_object(draw: ImageDraw.ImageDraw, obj: ObjectSpec, scale: float) -> None:
    """Draw `obj` filled with 255 on a supersampled canvas, `scale` canvas pixels per reference px."""
    # Continuous box [x0, x1) x [y0, y1) in canvas pixels; Pillow's rectangle and ellipse include
    # their far edge, hence the "- 1", and its polygons treat pixel centres as integer points,
    # hence the "- 0.5".
    x0, x1 = (obj.cx - obj.r) * scale, (obj.cx + obj.r) * scale
    y0, y1 = (obj.cy - obj.r) * scale, (obj.cy + obj.r) * scale
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif obj.shape == "triangle":
        apex = (obj.cx * scale - 0.5, y0 - 0.5)
        draw.polygon([apex, (x1 - 0.5, y1 - 0.5), (x0 - 0.5, y1 - 0.5)], fill=255)
    elif obj.shape == "cross":
        half_arm = CROSS_ARM_HALF_WIDTH * obj.r * scale
        cx, cy = obj.cx * scale, obj.cy * scale
        draw.rectangle((x0, cy - half_arm, x1 - 1, cy + half_arm - 1), fill=255)
        draw.rectangle((cx - half_arm, y0, cx + half_arm - 1, y1 - 1), fill=255)
    else:  # pragma: no cover - ObjectSpec validates the shape
        raise ValueError(obj.shape)


def object_coverage(obj: ObjectSpec, size: int = REFERENCE_SIZE) -> np.ndarray:
    """Anti-aliased coverage of `obj` on a `size` x `size` canvas, uint8 (0 empty .. 255 full)."""
    canvas_size = size * SUPERSAMPLING
    layer = Image.new("L", (canvas_size, canvas_size), 0)
    _draw_object(ImageDraw.Draw(layer), obj, canvas_size / REFERENCE_SIZE)
    return np.asarray(layer.resize((size, size), Image.BOX), dtype=np.uint8)


def _composite(background: str, objects: Sequence[ObjectSpec], coverages: Sequence[np.ndarray]) -> np.ndarray:
    size = coverages[0].shape[0]
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = BACKGROUNDS[background]
    for obj, coverage in zip(objects, coverages):
        alpha = coverage.astype(np.float32)[..., None] / 255.0
        # alpha == 0 leaves a pixel unchanged and alpha == 1 sets it exactly, so pixels an object
        # does not touch are bit-identical across scenes that differ only in that object.
        image = image * (1.0 - alpha) + np.asarray(COLOURS[obj.colour], dtype=np.float32) * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_with_coverage(scene: Scene, size: int = REFERENCE_SIZE) -> tuple[np.ndarray, list[np.ndarray]]:
    """Like `render`, but returns each object's uint8 coverage instead of its binary mask."""
    coverages = [object_coverage(obj, size) for obj in scene.objects]
    return _composite(scene.background, scene.objects, coverages), coverages


def render(scene: Scene, size: int = REFERENCE_SIZE) -> tuple[np.ndarray, list[np.ndarray]]:
    """Render `scene`: an RGB uint8 image (size, size, 3) and one bool mask (size, size) per object.

    A mask is the object's coverage >= 0.5, so it is exact, binary and consistent with the image.
    """
    image, coverages = render_with_coverage(scene, size)
    return image, [coverage >= 128 for coverage in coverages]


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of `mask` by a disc of `radius` pixels (numpy only)."""
    if radius <= 0:
        return mask.copy()
    height, width = mask.shape
    padded = np.pad(mask, radius)
    result = np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx * dx + dy * dy <= radius * radius:
                result |= padded[radius + dy : radius + dy + height, radius + dx : radius + dx + width]
    return result


# --------------------------------------------------------------------------------------------
# Edit pairs


def _phrase_count(text: str, phrase: str) -> int:
    """How often `phrase` occurs in `text` as whole words."""
    return f" {text} ".count(f" {phrase} ")


def _propose_edit(rng: np.random.Generator, kind: str):
    """One candidate (source, target, source index, target index, source_word, target_word)."""
    if kind in ("recolour", "reshape", "replace"):
        source = sample_scene(rng)
        index = int(rng.integers(len(source.objects)))
        old = source.objects[index]
        changes: dict[str, str] = {}
        if kind in ("recolour", "replace"):
            changes["colour"] = _pick(rng, tuple(c for c in COLOURS if c != old.colour))
        if kind in ("reshape", "replace"):
            changes["shape"] = _pick(rng, tuple(s for s in SHAPES if s != old.shape))
        new = dataclasses.replace(old, **changes)
        objects = list(source.objects)
        objects[index] = new
        target = Scene(source.background, tuple(objects))
        if kind == "recolour":
            words = (old.colour, new.colour)
        elif kind == "reshape":
            words = (old.shape, new.shape)
        else:
            words = (f"{old.colour} {old.shape}", f"{new.colour} {new.shape}")
        return source, target, index, target.objects.index(new), words[0], words[1]
    if kind == "add":
        source = sample_scene(rng, n_objects=1, single_position=_pick(rng, ("left", "right")))
        kept = source.objects[0]
        added = sample_object(rng, "right" if kept.position == "left" else "left")
        target = Scene(source.background, (kept, added))
        return source, target, None, target.objects.index(added), "", added.phrase
    if kind == "remove":
        source = sample_scene(rng, n_objects=2)
        index = int(rng.integers(2))
        target = Scene(source.background, (source.objects[1 - index],))
        return source, target, index, None, source.objects[index].phrase, ""
    if kind == "background":
        source = sample_scene(rng)
        new_background = _pick(rng, tuple(b for b in BACKGROUNDS if b != source.background))
        target = Scene(new_background, source.objects)
        return source, target, None, None, source.background, new_background
    raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")


def make_edit_pair(
    rng_or_seed: np.random.Generator | int,
    kind: str,
    size: int = REFERENCE_SIZE,
    split: str | None = None,
) -> EditPair:
    """A random edit of `kind` (one of ``EDIT_KINDS``), with its edit mask at `size` pixels.

    Candidates are redrawn until the changed span occurs exactly once in each caption (so a
    word-swap edit is unambiguous) and, when `split` is given, until both captions belong to it.
    """
    rng = as_rng(rng_or_seed)
    if split is not None:
        _check_name("split", split, SPLITS)
    while True:
        source, target, source_index, target_index, source_word, target_word = _propose_edit(rng, kind)
        unique = all(
            word == "" or _phrase_count(caption, word) == 1
            for caption, word in ((source.caption, source_word), (target.caption, target_word))
        )
        in_split = split is None or caption_split(source.caption) == caption_split(target.caption) == split
        if unique and in_split:
            break

    if kind == "background":
        # Every pixel an object does not fully cover shows some background, so it changes.
        coverages = [object_coverage(obj, size) for obj in source.objects]
        edit_mask = np.all([coverage < 255 for coverage in coverages], axis=0)
    else:
        edited = np.zeros((size, size), dtype=bool)
        if source_index is not None:
            edited |= object_coverage(source.objects[source_index], size) >= 128
        if target_index is not None:
            edited |= object_coverage(target.objects[target_index], size) >= 128
        edit_mask = dilate(edited, EDIT_MASK_DILATION)
    return EditPair(
        kind=kind,
        source=source,
        target=target,
        edit_mask=edit_mask,
        edited_object_index=target_index,
        source_word=source_word,
        target_word=target_word,
        size=size,
    )


def make_edit_pairs(
    seed: int,
    n_per_kind: int,
    size: int = REFERENCE_SIZE,
    split: str | None = None,
    kinds: Sequence[str] = EDIT_KINDS,
) -> list[EditPair]:
    """`n_per_kind` edit pairs of each kind, grouped by kind in `kinds` order; deterministic.

    Pair ``i`` of kind ``k`` has its own random stream seeded with ``[seed, 2, k's index, i]``, so
    pairs do not shift when `n_per_kind` or `kinds` change.
    """
    pairs = []
    for kind in kinds:
        _check_name("edit kind", kind, EDIT_KINDS)
        kind_index = EDIT_KINDS.index(kind)
        for i in range(n_per_kind):
            rng = np.random.default_rng([seed, _EDIT_STREAM, kind_index, i])
            pairs.append(make_edit_pair(rng, kind, size=size, split=split))
    return pairs


def _check_name(what: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {tuple(allowed)}")
