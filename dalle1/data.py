"""Captioned image data: the built-in synthetic shapes set and the folder format.

The folder format is what users bring: ``photo.png`` next to ``photo.txt``; the
text file holds one caption per line and one line is picked at random each time
the image is drawn. The built-in set is written in that same format, so the
demo exercises exactly the path a user's data takes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from tqdm.auto import tqdm

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")

# ---------------------------------------------------------------------------
# The built-in synthetic set: coloured shapes with sizes, positions, relations
# ---------------------------------------------------------------------------

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


def random_scene(rng: random.Random, max_shapes: int = 1) -> tuple[list[Shape], list[str]]:
    """One scene and its captions (most specific first; every line is true of the image)."""
    colors, kinds = list(COLORS), list(SHAPES)
    if max_shapes < 2 or rng.random() < 0.5:
        size = rng.choice(list(SIZES))
        place = rng.choice(list(PLACES))
        s = Shape(rng.choice(colors), rng.choice(kinds), size, PLACES[place])
        captions = [
            f"a {s.describe()} {place}",
            f"a {s.describe(False)} {place}",
            f"a {s.describe()}",
            f"a {s.describe(False)}",
        ]
        return [s], captions
    # two shapes side by side or one above the other
    a = Shape(rng.choice(colors), rng.choice(kinds), "small", (0.0, 0.0))
    b = Shape(
        rng.choice([c for c in colors if c != a.color]), rng.choice(kinds), "small", (0.0, 0.0)
    )
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
) -> Path:
    """Write ``count`` images with same-stem caption files to ``out``; deterministic in ``seed``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in tqdm(range(count), desc="shapes dataset", disable=not progress):
        shapes, captions = random_scene(rng, max_shapes)
        render(shapes, image_size).save(out / f"{i:06d}.png")
        (out / f"{i:06d}.txt").write_text("\n".join(captions) + "\n")
    return out


# ---------------------------------------------------------------------------
# Reading a folder of captioned images
# ---------------------------------------------------------------------------


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """An image file -> float tensor (3, size, size) in [0, 1]: RGB, shorter side resized, centre crop."""
    with Image.open(path) as img:
        return pil_to_tensor(img, image_size)


def pil_to_tensor(img: Image.Image, image_size: int) -> torch.Tensor:
    img = img.convert("RGB")
    w, h = img.size
    scale = image_size / min(w, h)
    if scale != 1:
        img = img.resize(
            (max(image_size, round(w * scale)), max(image_size, round(h * scale))),
            Image.Resampling.BICUBIC,
        )
    w, h = img.size
    left, top = (w - image_size) // 2, (h - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> PIL image."""
    array = (
        (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255)
        .round()
        .astype(np.uint8)
    )
    return Image.fromarray(array)


def read_captions(path: Path) -> list[str]:
    lines = [
        line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
    ]
    return [line for line in lines if line]


def find_pairs(root: str | Path) -> list[tuple[Path, Path]]:
    """All (image, caption file) pairs under ``root``, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder '{root}' does not exist")
    pairs = []
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        caption = image.with_suffix(".txt")
        if caption.exists():
            pairs.append((image, caption))
    if not pairs:
        raise FileNotFoundError(f"no image with a same-stem .txt caption found under '{root}'")
    return pairs


class CaptionedFolder(Dataset):
    """(image in [0, 1], caption) pairs from a folder; one caption line picked per draw."""

    def __init__(
        self, root: str | Path, image_size: int, pairs: list[tuple[Path, Path]] | None = None
    ):
        self.image_size = image_size
        self.pairs = pairs if pairs is not None else find_pairs(root)
        self.captions = [read_captions(c) for _, c in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image = load_image(self.pairs[index][0], self.image_size)
        options = self.captions[index] or [""]
        caption = options[int(torch.randint(len(options), ()))]
        return image, caption

    def all_captions(self) -> list[str]:
        return [c for lines in self.captions for c in lines]


def split_pairs(pairs: list, val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Deterministic train / held-out split of a list of pairs."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(pairs) * val_fraction)) if len(pairs) > 1 else 0
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [pairs[i] for i in train], [pairs[i] for i in val]


def ensure_dataset(cfg) -> Path:
    """Generate the built-in set at ``cfg.path`` if asked to (``synthetic_count > 0``) and missing."""
    path = Path(cfg.path)
    if cfg.synthetic_count > 0 and not any(path.glob("*.txt")):
        make_shapes_dataset(
            path, cfg.synthetic_count, cfg.image_size, cfg.seed, cfg.synthetic_max_shapes
        )
    return path


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> torch.Tensor:
    """(B, 3, H, W) -> one (3, H', W') image with ``nrow`` images per row (white padding)."""
    b, c, h, w = images.shape
    ncol = min(nrow, b)
    nrows = (b + ncol - 1) // ncol
    grid = torch.ones(c, nrows * (h + padding) + padding, ncol * (w + padding) + padding)
    for i, image in enumerate(images):
        r, k = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top : top + h, left : left + w] = image.detach().float().cpu()
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, scale: int = 1) -> Path:
    """Write a grid of images in [0, 1] as a PNG (nearest-neighbour upscaled by ``scale``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = tensor_to_pil(make_grid(images, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    img.save(path)
    return path
