"""Read toy-world attributes back from an RGB image, with fixed rules (nothing is learnt).

Meant to score images from a small generative model as well as rendered ground truth, so every
rule tolerates mild noise, blur and off-palette colours:

* background: the per-channel median of a 2-px border frame (objects never touch the border),
  named by the nearest ``BACKGROUNDS`` colour;
* foreground: pixels nearer to some object colour than to the measured background colour, and not
  within ``MIN_FOREGROUND_DISTANCE`` of the background (for a rendered edge pixel this is about
  coverage >= 0.5, matching the ground-truth masks); holes are filled and the mask is opened with
  a 3x3 square, then 4-connected components smaller than ``MIN_COMPONENT_PIXELS`` (at 128 px) are
  dropped as specks;
* colour: the nearest ``COLOURS`` entry to the median of the component's interior pixels;
* shape: from three scale-free features of the component: how far its centroid sits below the
  middle of its bounding box, as a fraction of the box height (1/6 for the upright triangle, 0 for
  the symmetric shapes); its solidity, area over convex-hull area (about 1 except for a cross,
  ~0.73); and its fill of the bounding box (square 1, circle pi/4). Each threshold lies halfway
  between the nominal values it separates;
* size: the radius implied by the area for the detected shape, against the midpoint of the small
  and large radii;
* position: the centroid's x against thresholds halfway between the placement ranges of
  left/center/right objects.

All geometry thresholds are in reference (128-px) units and scale with the image size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from . import scenes

ATTRIBUTES = ("shape", "colour", "size", "position")

BORDER_WIDTH = 2
MIN_FOREGROUND_DISTANCE = 40.0
"""RGB distance from the background below which a pixel is background whatever else it is near."""

MIN_COMPONENT_PIXELS = 20
"""Components smaller than this (at 128 px, scaled by area) are noise, not objects."""

# Nominal feature values of the ideal shapes (see the module docstring).
_TRIANGLE_CENTROID_OFFSET = 1 / 6  # centroid at 2/3 of the height from the apex, box middle at 1/2
_CROSS_SOLIDITY = scenes.shape_area_factor("cross") / scenes.shape_hull_area_factor("cross")
_SQUARE_FILL = 1.0
_CIRCLE_FILL = math.pi / 4

TRIANGLE_OFFSET_THRESHOLD = _TRIANGLE_CENTROID_OFFSET / 2
CROSS_SOLIDITY_THRESHOLD = (1.0 + _CROSS_SOLIDITY) / 2
SQUARE_FILL_THRESHOLD = (_SQUARE_FILL + _CIRCLE_FILL) / 2

SIZE_RADIUS_THRESHOLD = (scenes.SIZES["small"] + scenes.SIZES["large"]) / 2

_MIDDLE = scenes.REFERENCE_SIZE / 2
_SMALLEST_R = min(scenes.SIZES.values())
# Largest cx of a left object / smallest of a right one, and the range of a centred one.
_LEFT_MAX_CX = _MIDDLE - scenes.MIDLINE_GAP - _SMALLEST_R
_RIGHT_MIN_CX = _MIDDLE + scenes.MIDLINE_GAP + _SMALLEST_R
LEFT_THRESHOLD = (_LEFT_MAX_CX + _MIDDLE - scenes.CENTER_JITTER) / 2
RIGHT_THRESHOLD = (_RIGHT_MIN_CX + _MIDDLE + scenes.CENTER_JITTER) / 2

_COLOUR_NAMES = tuple(scenes.COLOURS)
_COLOUR_VALUES = np.array([scenes.COLOURS[name] for name in _COLOUR_NAMES], dtype=np.float32)
_BACKGROUND_NAMES = tuple(scenes.BACKGROUNDS)
_BACKGROUND_VALUES = np.array([scenes.BACKGROUNDS[name] for name in _BACKGROUND_NAMES], dtype=np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class DetectedObject:
    """An object found in an image. ``centroid`` is (x, y) in pixels of that image."""

    shape: str
    colour: str
    size: str
    position: str
    centroid: tuple[float, float]
    area: int
    centroid_offset: float
    solidity: float
    fill: float
    mask: np.ndarray

    def as_dict(self) -> dict[str, Any]:
        """Everything but the mask, as plain Python values."""
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "position": self.position,
            "centroid": self.centroid,
            "area": self.area,
            "centroid_offset": self.centroid_offset,
            "solidity": self.solidity,
            "fill": self.fill,
        }


def _as_image(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {array.shape}")
    return array


def _border_colour(image: np.ndarray) -> np.ndarray:
    """Per-channel median of the pixels in a frame BORDER_WIDTH wide."""
    frame = np.ones(image.shape[:2], dtype=bool)
    frame[BORDER_WIDTH:-BORDER_WIDTH, BORDER_WIDTH:-BORDER_WIDTH] = False
    return np.median(image[frame].astype(np.float32), axis=0)


def _nearest(colour: np.ndarray, names: Sequence[str], values: np.ndarray) -> str:
    return names[int(np.argmin(np.linalg.norm(values - colour, axis=1)))]


def classify_background(image: np.ndarray) -> str:
    """Name of the background: the ``BACKGROUNDS`` colour nearest to the border's median colour."""
    return _nearest(_border_colour(_as_image(image)), _BACKGROUND_NAMES, _BACKGROUND_VALUES)


def _convex_hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the pixel squares of `mask` (Andrew's monotone chain)."""
    rows = np.flatnonzero(mask.any(axis=1))
    first = mask[rows].argmax(axis=1)
    last = mask.shape[1] - 1 - mask[rows, ::-1].argmax(axis=1)
    # Only the outer corners of each row's extreme pixels can be hull vertices.
    xs = np.concatenate([first, first, last + 1, last + 1]).astype(np.float64)
    ys = np.concatenate([rows, rows + 1, rows, rows + 1]).astype(np.float64)
    points = sorted(set(zip(xs.tolist(), ys.tolist())))

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half_hull(ordered):
        hull: list[tuple[float, float]] = []
        for point in ordered:
            while len(hull) >= 2 and cross(hull[-2], hull[-1], point) <= 0:
                hull.pop()
            hull.append(point)
        return hull

    lower, upper = half_hull(points), half_hull(points[::-1])
    hull = np.array(lower[:-1] + upper[:-1])
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def classify_shape(centroid_offset: float, solidity: float, fill: float) -> str:
    """Shape from the centroid's offset from the box middle, solidity and fill (see the module docstring).

    The triangle is told by its lopsided centroid rather than its low fill because removing noisy
    edge pixels clips its apex, which raises its fill towards a circle's but keeps it lopsided.
    The offset is taken unsigned so that an upside-down triangle from a generator still counts.
    """
    if abs(centroid_offset) > TRIANGLE_OFFSET_THRESHOLD:
        return "triangle"
    if solidity < CROSS_SOLIDITY_THRESHOLD:
        return "cross"
    if fill >= SQUARE_FILL_THRESHOLD:
        return "square"
    return "circle"


def classify_position(centroid_x: float, width: int) -> str:
    """Position ("left", "center" or "right") from the centroid's x in an image `width` pixels wide."""
    x = centroid_x * scenes.REFERENCE_SIZE / width
    if x < LEFT_THRESHOLD:
        return "left"
    if x > RIGHT_THRESHOLD:
        return "right"
    return "center"


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """Pixels that belong to objects (see the module docstring), holes filled."""
    image = _as_image(image)
    pixels = image.astype(np.float32)
    distance_to_background = np.linalg.norm(pixels - _border_colour(image), axis=-1)
    distance_to_objects = np.linalg.norm(pixels[..., None, :] - _COLOUR_VALUES, axis=-1).min(axis=-1)
    foreground = (distance_to_objects < distance_to_background) & (
        distance_to_background > MIN_FOREGROUND_DISTANCE
    )
    foreground = ndimage.binary_fill_holes(foreground)
    # Opening removes one-pixel specks and protrusions that noise leaves along blurred edges; they
    # would stretch a small object's bounding box and so its fill (a 28-px square by 7 %).
    return ndimage.binary_opening(foreground, structure=np.ones((3, 3), dtype=bool))


def find_objects(image: np.ndarray) -> list[DetectedObject]:
    """Objects in `image`, sorted left to right by centroid."""
    image = _as_image(image)
    height, width = image.shape[:2]
    area_scale = height * width / scenes.REFERENCE_SIZE**2
    labels, count = ndimage.label(foreground_mask(image))
    detected = []
    for label in range(1, count + 1):
        mask = labels == label
        area = int(mask.sum())
        if area < MIN_COMPONENT_PIXELS * area_scale:
            continue
        ys, xs = np.nonzero(mask)
        box_width, box_height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        fill = area / float(box_width * box_height)
        solidity = area / _convex_hull_area(mask)
        # Pixel centres are at +0.5, so the box middle is (min + max + 1) / 2 in centre coordinates.
        centroid_offset = float((ys.mean() + 0.5 - (ys.min() + ys.max() + 1) / 2) / box_height)
        shape = classify_shape(centroid_offset, solidity, fill)

        radius = math.sqrt(area / area_scale / scenes.shape_area_factor(shape))
        size = "large" if radius >= SIZE_RADIUS_THRESHOLD else "small"

        # Edge pixels mix with the background; the interior carries the true colour.
        interior = ndimage.binary_erosion(mask)
        colour_pixels = image[interior if interior.sum() >= 10 else mask].astype(np.float32)
        colour = _nearest(np.median(colour_pixels, axis=0), _COLOUR_NAMES, _COLOUR_VALUES)

        centroid = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)  # pixel centres at +0.5
        detected.append(
            DetectedObject(
                shape=shape,
                colour=colour,
                size=size,
                position=classify_position(centroid[0], width),
                centroid=centroid,
                area=area,
                centroid_offset=centroid_offset,
                solidity=solidity,
                fill=fill,
                mask=mask,
            )
        )
    return sorted(detected, key=lambda obj: obj.centroid[0])


def classify(image: np.ndarray) -> dict[str, Any]:
    """{"background": name, "objects": [object dicts without masks, left to right]}."""
    return {
        "background": classify_background(image),
        "objects": [obj.as_dict() for obj in find_objects(image)],
    }


def _attribute(detected: DetectedObject | Mapping[str, Any], name: str) -> Any:
    return detected[name] if isinstance(detected, Mapping) else getattr(detected, name)


def object_matches(spec: scenes.ObjectSpec, detected: DetectedObject | Mapping[str, Any]) -> dict[str, bool]:
    """For each of ``ATTRIBUTES``, whether `detected` (object or dict) agrees with `spec`."""
    return {name: getattr(spec, name) == _attribute(detected, name) for name in ATTRIBUTES}


def scene_attribute_report(scene: scenes.Scene, image: np.ndarray) -> dict[str, Any]:
    """How many of `scene`'s prompted attributes `image` shows, and which.

    Each scene object is matched one-to-one to the detection whose centroid is nearest to the
    object's centre (greedily, closest pairs first); an unmatched object gets every attribute
    wrong. Scored attributes: the background, and each object's shape, colour, size and position.
    Extra detections are not penalised but are counted in "n_detected".
    """
    image = _as_image(image)
    height, width = image.shape[:2]
    detections = find_objects(image)
    expected = [
        (obj.cx * width / scenes.REFERENCE_SIZE, obj.cy * height / scenes.REFERENCE_SIZE)
        for obj in scene.objects
    ]
    candidates = sorted(
        (math.dist(centre, det.centroid), i, j)
        for i, centre in enumerate(expected)
        for j, det in enumerate(detections)
    )
    match: dict[int, int] = {}
    used: set[int] = set()
    for _, i, j in candidates:
        if i not in match and j not in used:
            match[i] = j
            used.add(j)

    background_ok = classify_background(image) == scene.background
    per_object = [
        object_matches(obj, detections[match[i]]) if i in match else dict.fromkeys(ATTRIBUTES, False)
        for i, obj in enumerate(scene.objects)
    ]
    correct = int(background_ok) + sum(sum(result.values()) for result in per_object)
    total = 1 + len(ATTRIBUTES) * len(scene.objects)
    return {
        "background": background_ok,
        "objects": per_object,
        "n_detected": len(detections),
        "correct": correct,
        "total": total,
        "accuracy": correct / total,
    }


def scene_attribute_accuracy(scene: scenes.Scene, image: np.ndarray) -> float:
    """Fraction of `scene`'s prompted attributes recovered from `image` (see the report)."""
    return scene_attribute_report(scene, image)["accuracy"]
