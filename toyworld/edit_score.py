"""Scoring an edit in place: the target attributes where the source object was, and nothing else moved.

An edit of a real image should change what the prompt changes and keep the layout. The lenient test
(`lenient_success`, what the quality benchmark counted before) asks only whether the classifier finds
the target attributes on the object it matches to the edited one, so an object redrawn 20 px away, or
at another size, still counted. `score_edit` also asks where and how big every object is:

* each object of the target scene is expected where its ground-truth rendering puts it: the centroid
  of its ground-truth mask (for a triangle that is a third of r below the box centre, so the expected
  centroid is taken from the mask, not from (cx, cy)), and its size as the *equivalent radius*
  sqrt(area / shape_area_factor(shape)) of that mask (r for an ideal rendering of any shape);
* the detection nearest to that centroid (one-to-one, closest pairs first, as the classifier's scene
  report matches) is the object as drawn; its *drift* is the distance between the two centroids and
  its *size error* the difference of the equivalent radii (both with the target's shape, so a reshape
  to a square of the same r has no size error);
* an object is **in place** when drift <= ``POSITION_TOLERANCE_PX`` and |size error| <=
  ``SIZE_TOLERANCE_PX`` (reference 128-px units, scaled with the image).

Tolerances. The model works on an 8x8-pixel latent grid (16x16 latents at 128 px), so an edit that
keeps the layout to the latent cell may still put an edge half a cell off: 4 px. Both tolerances are
half a latent cell. Scale: the smallest object has r = 14 (a 28-px box), so a 4-px shift keeps more
than 70 % of a small square's area in place, and a 5-px shift is already more than a third of the
smallest object's radius. The ceiling is well inside them (both measured in
tests/toyworld/test_edit_score.py): the classifier reads a rendered object within 0.5 px of its
ground-truth centroid and 1 px of its equivalent radius, and after the committed toy model's VAE round
trip within 1 px and 1.5 px; an object a whole latent cell (8 px) away, or 6 px larger, fails.

In-place success per edit kind:

* recolour, reshape, replace: the edited object has all four target attributes and is in place; every
  other object keeps its attributes and place; no extra object appears;
* add: the added object has its attributes (its half of the image is the position attribute; its exact
  place is the model's choice, its drift is not scored) and the kept object is in place;
* remove: the removed object is gone (one detection) and the kept object is in place;
* background: the background colour is the target's and every object is in place.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from . import classifier, scenes

LATENT_CELL_PX = 8
"""Pixels per latent element: the VAE downsamples 8 times (16x16 latents for 128-px images)."""

POSITION_TOLERANCE_PX = LATENT_CELL_PX / 2
"""Largest centroid drift (reference px) of an object that stays in place: half a latent cell."""

SIZE_TOLERANCE_PX = LATENT_CELL_PX / 2
"""Largest change of an object's equivalent radius (reference px) that keeps its size: half a latent cell."""


@dataclasses.dataclass(frozen=True)
class Expected:
    """Where a target object should be: its ground-truth centroid (x, y) and equivalent radius, in image px."""

    spec: scenes.ObjectSpec
    centroid: tuple[float, float]
    radius: float


@dataclasses.dataclass(frozen=True)
class Placement:
    """One target object as drawn: matched or not, its attributes, drift and size error (reference px)."""

    found: bool
    attributes: dict[str, bool]
    drift: float | None
    size_error: float | None

    @property
    def attributes_ok(self) -> bool:
        return self.found and all(self.attributes.values())

    @property
    def in_place(self) -> bool:
        return (self.found and self.drift is not None and self.drift <= POSITION_TOLERANCE_PX
                and abs(self.size_error) <= SIZE_TOLERANCE_PX)


def equivalent_radius(area: float, shape: str, image_side: int) -> float:
    """The r (reference px) of a `shape` whose area is `area` pixels in an image `image_side` wide."""
    scale = image_side / scenes.REFERENCE_SIZE
    return math.sqrt(area / (scale * scale) / scenes.shape_area_factor(shape))


def mask_centroid(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of a mask's pixel centres (pixel centres at +0.5, as the classifier reports centroids)."""
    ys, xs = np.nonzero(mask)
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


def expected_objects(scene: scenes.Scene, size: int) -> list[Expected]:
    """Every object of `scene` as its ground-truth rendering at `size` px places it."""
    _, masks = scenes.render(scene, size)
    return [Expected(obj, mask_centroid(m), equivalent_radius(float(m.sum()), obj.shape, size))
            for obj, m in zip(scene.objects, masks)]


def match(expected: list[Expected], detections: list[classifier.DetectedObject]) -> dict[int, int]:
    """Expected object i -> detection j, one-to-one, nearest centroids first (the classifier's rule)."""
    candidates = sorted((math.dist(e.centroid, d.centroid), i, j)
                        for i, e in enumerate(expected) for j, d in enumerate(detections))
    found: dict[int, int] = {}
    used: set[int] = set()
    for _, i, j in candidates:
        if i not in found and j not in used:
            found[i] = j
            used.add(j)
    return found


def placements(scene: scenes.Scene, image: np.ndarray) -> tuple[list[Placement], int]:
    """Each of `scene`'s objects as `image` draws it, and how many objects the image shows."""
    side = image.shape[1]
    to_reference = scenes.REFERENCE_SIZE / side
    expected = expected_objects(scene, side)
    detections = classifier.find_objects(image)
    matched = match(expected, detections)
    out = []
    for i, e in enumerate(expected):
        if i not in matched:
            out.append(Placement(False, dict.fromkeys(classifier.ATTRIBUTES, False), None, None))
            continue
        d = detections[matched[i]]
        drift = math.dist(e.centroid, d.centroid) * to_reference
        size_error = equivalent_radius(d.area, e.spec.shape, side) - e.radius
        out.append(Placement(True, classifier.object_matches(e.spec, d), drift, size_error))
    return out, len(detections)


def lenient_success(pair: scenes.EditPair, image: np.ndarray) -> bool:
    """The old test: the target attributes on the object matched to the edited one, wherever it is; for
    "remove" the object count, for "background" the background colour."""
    report = classifier.scene_attribute_report(pair.target, image)
    if pair.kind == "background":
        return bool(report["background"])
    if pair.kind == "remove":
        return report["n_detected"] == len(pair.target.objects)
    return all(report["objects"][pair.edited_object_index].values())


def score_edit(pair: scenes.EditPair, image: np.ndarray) -> dict[str, Any]:
    """In-place and lenient success of an edit, with the edited object's drift and size error (reference
    px; None where there is no edited object in place to measure: remove, background, add, or not found)
    and the largest drift among the kept objects (see the module docstring)."""
    places, n_detected = placements(pair.target, np.asarray(image))
    edited = pair.edited_object_index
    kept = [p for i, p in enumerate(places) if i != edited]
    kept_ok = all(p.attributes_ok and p.in_place for p in kept)
    if pair.kind in ("recolour", "reshape", "replace"):
        target_ok = places[edited].attributes_ok and places[edited].in_place
    elif pair.kind == "add":
        target_ok = places[edited].attributes_ok
    elif pair.kind == "remove":
        target_ok = True  # the count below says whether it is gone
    elif pair.kind == "background":
        target_ok = classifier.classify_background(image) == pair.target.background
    else:
        raise ValueError(f"unknown edit kind {pair.kind!r}")
    measured = places[edited] if pair.kind in ("recolour", "reshape", "replace") else None
    kept_drifts = [p.drift for p in kept if p.drift is not None]
    return {
        "success": bool(target_ok and kept_ok and n_detected == len(pair.target.objects)),
        "success_lenient": lenient_success(pair, image),
        "drift_px": None if measured is None or measured.drift is None else measured.drift,
        "size_error_px": None if measured is None or measured.size_error is None else measured.size_error,
        "kept_drift_px": max(kept_drifts) if kept_drifts else None,
        "kept_ok": kept_ok,
        "n_detected": n_detected,
    }


__all__ = ["POSITION_TOLERANCE_PX", "SIZE_TOLERANCE_PX", "LATENT_CELL_PX", "Placement", "Expected", "score_edit",
           "lenient_success", "placements", "expected_objects", "equivalent_radius", "mask_centroid"]
