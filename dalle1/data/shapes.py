"""The built-in synthetic set: coloured shapes with sizes, positions and relations.

Every image is written with same-stem caption lines (most specific first, every
line true of the image) in the folder format (:mod:`dalle1.data.folder`), so the
demo and the tests train on exactly the path a user's data takes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 70, 230),
    "yellow": (240, 210, 20),
    "purple": (150, 40, 190),
    "white": (245, 245, 245),
}


SHAPES = ("circle", "square", "triangle")


SIZES = {"small": 0.24, "large": 0.42}  # side as a fraction of the image


# 3x3 placements: caption phrase -> centre (x, y) as fractions of the image
PLACES = {
    "at the top left": (0.25, 0.25),
    "at the top": (0.5, 0.25),
    "at the top right": (0.75, 0.25),
    "on the left": (0.25, 0.5),
    "in the center": (0.5, 0.5),
    "on the right": (0.75, 0.5),
    "at the bottom left": (0.25, 0.75),
    "at the bottom": (0.5, 0.75),
    "at the bottom right": (0.75, 0.75),
}


BACKGROUND = (40, 40, 40)


@dataclass
class Shape:
    color: str
    kind: str
    size: str
    center: tuple[float, float]  # fractions of the image

    def describe(self, with_size: bool = True) -> str:
        return f"{self.size + ' ' if with_size else ''}{self.color} {self.kind}"


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, canvas: int) -> None:
    half = SIZES[shape.size] * canvas / 2
    cx, cy = shape.center[0] * canvas, shape.center[1] * canvas
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = COLORS[shape.color]
    if shape.kind == "circle":
        draw.ellipse(box, fill=fill)
    elif shape.kind == "square":
        draw.rectangle(box, fill=fill)
    else:  # triangle pointing up
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)


def render(shapes: list[Shape], image_size: int) -> Image.Image:
    """Draw shapes at 4x resolution and downsample, for smooth edges."""
    canvas = image_size * 4
    img = Image.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for shape in shapes:
        draw_shape(draw, shape, canvas)
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS)


def parse_pairs(pairs: list[str] | tuple[str, ...]) -> frozenset[tuple[str, str]]:
    """``["red square", "blue triangle"]`` -> {("red", "square"), ("blue", "triangle")}.

    These are the colour × shape combinations a compositional benchmark holds out:
    no image of the built-in set then shows them, in any scene.
    """
    found = set()
    for text in pairs:
        words = text.split()
        if len(words) != 2 or words[0] not in COLORS or words[1] not in SHAPES:
            raise ValueError(
                f"'{text}' is not a 'colour shape' pair; colours: {', '.join(COLORS)}; "
                f"shapes: {', '.join(SHAPES)}"
            )
        found.add((words[0], words[1]))
    if len(found) >= len(COLORS) * len(SHAPES):
        raise ValueError("holding out every colour × shape pair leaves nothing to draw")
    return frozenset(found)


def _pick(rng: random.Random, colors: list[str], holdout: frozenset) -> tuple[str, str]:
    """A colour and a shape, drawn again while the pair is held out (no extra draws if none is)."""
    while True:
        color, kind = rng.choice(colors), rng.choice(SHAPES)
        if (color, kind) not in holdout:
            return color, kind


def random_scene(
    rng: random.Random, max_shapes: int = 1, holdout: frozenset = frozenset()
) -> tuple[list[Shape], list[str]]:
    """One scene and its captions (most specific first; every line is true of the image).

    ``holdout``: colour × shape pairs (:func:`parse_pairs`) that never appear.
    """
    colors = list(COLORS)
    if max_shapes < 2 or rng.random() < 0.5:
        size = rng.choice(list(SIZES))
        place = rng.choice(list(PLACES))
        color, kind = _pick(rng, colors, holdout)
        s = Shape(color, kind, size, PLACES[place])
        captions = [
            f"a {s.describe()} {place}",
            f"a {s.describe(False)} {place}",
            f"a {s.describe()}",
            f"a {s.describe(False)}",
        ]
        return [s], captions
    # two shapes side by side or one above the other
    a = Shape(*_pick(rng, colors, holdout), "small", (0.0, 0.0))
    b = Shape(*_pick(rng, [c for c in colors if c != a.color], holdout), "small", (0.0, 0.0))
    if rng.random() < 0.5:
        x = rng.choice((0.3, 0.5, 0.7))
        a.center, b.center = (x, 0.27), (x, 0.73)
        captions = [
            f"a {a.describe(False)} above a {b.describe(False)}",
            f"a {b.describe(False)} below a {a.describe(False)}",
        ]
    else:
        y = rng.choice((0.3, 0.5, 0.7))
        a.center, b.center = (0.27, y), (0.73, y)
        captions = [
            f"a {a.describe(False)} to the left of a {b.describe(False)}",
            f"a {b.describe(False)} to the right of a {a.describe(False)}",
        ]
    return [a, b], captions


def make_shapes_dataset(
    out: str | Path,
    count: int = 4000,
    image_size: int = 32,
    seed: int = 0,
    max_shapes: int = 1,
    progress: bool = True,
    holdout: list[str] | tuple[str, ...] = (),
) -> Path:
    """Write ``count`` images with same-stem caption files to ``out``; deterministic in ``seed``.

    ``holdout``: "colour shape" pairs that no image shows (a compositional benchmark).
    """
    held = parse_pairs(holdout)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in tqdm(range(count), desc="shapes dataset", disable=not progress):
        shapes, captions = random_scene(rng, max_shapes, held)
        render(shapes, image_size).save(out / f"{i:06d}.png")
        (out / f"{i:06d}.txt").write_text("\n".join(captions) + "\n")
    return out
