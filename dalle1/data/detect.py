"""A detector for the built-in shapes: which coloured shapes does an image show?

It judges samples of a model trained on the built-in set (:mod:`dalle1.data.shapes`),
independently of the model and of any learned scorer: pixels are assigned to the
nearest palette colour when they are closer to it than to the background, each
colour's connected regions are found, and a region's shape is read from its row
widths (a square is full to its corners, a triangle narrows to the top, a circle is
full in the middle and thin at both ends). It reads clean renders of every colour,
shape, size and place correctly (tests/test_compose.py checks it).

:func:`judge` turns the detections for a one-object prompt into one verdict, so that
failures can be counted by kind: ``ok``, ``wrong colour``, ``wrong shape``, ``wrong
both``, ``two objects``, ``blob`` (the right colour but no recognisable shape) and
``none`` (nothing drawn).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .shapes import COLORS

VERDICTS = ("ok", "wrong colour", "wrong shape", "wrong both", "two objects", "blob", "none")
MIN_AREA_FRACTION = 0.01  # regions under 1% of the image are specks, not objects
SPECK_RATIO = 0.25  # a second region under 25% of the largest does not count as an object

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
_NAMES = list(COLORS)


@dataclass
class Detection:
    color: str
    shape: str  # circle | square | triangle | blob
    area: int  # pixels
    center: tuple[float, float]  # (x, y) in pixels


def _regions(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of a boolean mask, each as an (n, 2) array of (y, x)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    found = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, points = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            points.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        found.append(np.array(points))
    return found


def classify_shape(region: np.ndarray) -> str:
    """A boolean mask cropped to a region's bounding box -> circle | square | triangle | blob."""
    h, w = region.shape
    if h < 3 or w < 3 or not 0.6 <= w / h <= 1.67:
        return "blob"
    fill = region.mean()
    widths = region.sum(1) / w  # how full each row is, top to bottom
    quarter = max(1, h // 4)
    top, bottom = widths[:quarter].mean(), widths[-quarter:].mean()
    middle = widths[h // 2 - 1 : h // 2 + 1].mean()
    if fill > 0.88 and top > 0.8 and bottom > 0.8:
        return "square"
    if top < 0.45 and bottom > 0.75 and 0.35 < fill < 0.7:
        return "triangle"
    if 0.62 < fill < 0.9 and abs(top - bottom) < 0.25 and middle > 0.85:
        return "circle"
    return "blob"


def detect(image: Image.Image | np.ndarray) -> list[Detection]:
    """Every coloured region of an image, largest first."""
    x = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    x = x.astype(np.float32)
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    background = np.median(border, 0)  # the built-in set has a plain background
    to_background = np.linalg.norm(x - background, axis=-1)
    to_palette = np.linalg.norm(x[:, :, None] - _PALETTE[None, None], axis=-1)
    nearest = to_palette.argmin(-1)
    foreground = to_palette.min(-1) < to_background  # the midpoint rule
    min_area = max(4, int(MIN_AREA_FRACTION * x.shape[0] * x.shape[1]))
    found = []
    for index, name in enumerate(_NAMES):
        mask = foreground & (nearest == index)
        for points in _regions(mask):
            if len(points) < min_area:
                continue
            (y0, x0), (y1, x1) = points.min(0), points.max(0)
            crop = np.zeros((y1 - y0 + 1, x1 - x0 + 1), dtype=bool)
            crop[points[:, 0] - y0, points[:, 1] - x0] = True
            center = ((x0 + x1) / 2, (y0 + y1) / 2)
            found.append(Detection(name, classify_shape(crop), len(points), center))
    return sorted(found, key=lambda d: -d.area)


def judge(image: Image.Image | np.ndarray, color: str, shape: str) -> str:
    """One verdict (:data:`VERDICTS`) for an image asked to show one ``color`` ``shape``."""
    found = detect(image)
    if not found:
        return "none"
    objects = [d for d in found if d.area >= SPECK_RATIO * found[0].area]
    if len(objects) > 1:
        return "two objects"
    got = objects[0]
    if got.shape == "blob":
        return "blob" if got.color == color else "wrong colour"
    if got.color == color:
        return "ok" if got.shape == shape else "wrong shape"
    return "wrong colour" if got.shape == shape else "wrong both"
