"""A second built-in captioned set, unlike the shapes: coloured digits ("a red seven").

Each image shows one digit, drawn with Pillow's built-in font in one of six colours
on a light ground, at a random size and position. The captions name colour and
digit in three phrasings (``a red seven``, ``the digit seven in red``, ``a seven``):
one line is drawn each time the image is used, as for any folder of the user's.

It exists to try the README's "train on your own images" walkthrough on data that
is not the demo's, with an independent check of the samples: :func:`read_glyph`
reads colour and digit back from the pixels (template matching against the same
font; it reads the generated images themselves correctly, which the tests check).
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLORS = {
    "red": (215, 35, 35),
    "green": (30, 150, 50),
    "blue": (35, 70, 220),
    "orange": (240, 140, 20),
    "purple": (140, 40, 180),
    "black": (20, 20, 20),
}
BACKGROUND = (245, 245, 240)
SCALE = 4  # drawn at 4x, then downsampled, for smooth edges


def glyph_captions(color: str, digit: int) -> list[str]:
    word = DIGITS[digit]
    a = "an" if color[0] in "aeiou" else "a"
    an = "an" if word[0] in "aeiou" else "a"
    return [f"{a} {color} {word}", f"the digit {word} in {color}", f"{an} {word}"]


def render_glyph(
    digit: int, color: str, image_size: int, height: float, center: tuple
) -> Image.Image:
    """One digit of ``height`` (fraction of the image) centred at ``center`` (fractions)."""
    canvas = image_size * SCALE
    img = Image.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(8, round(height * canvas * 1.35)))
    x0, y0, x1, y1 = draw.textbbox((0, 0), str(digit), font=font)
    cx, cy = center[0] * canvas, center[1] * canvas
    draw.text((cx - (x0 + x1) / 2, cy - (y0 + y1) / 2), str(digit), font=font, fill=COLORS[color])
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS)


def make_glyphs_dataset(
    out: str | Path, count: int = 3000, image_size: int = 32, seed: int = 0, progress: bool = True
) -> Path:
    """Write ``count`` digit images with same-stem caption files to ``out``; deterministic."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in tqdm(range(count), desc="glyphs dataset", disable=not progress):
        digit, color = rng.randrange(10), rng.choice(list(COLORS))
        height = rng.uniform(0.5, 0.75)
        margin = height / 2 * 0.8
        center = (rng.uniform(margin, 1 - margin), rng.uniform(0.5 - 0.15, 0.5 + 0.15))
        render_glyph(digit, color, image_size, height, center).save(out / f"{i:06d}.png")
        (out / f"{i:06d}.txt").write_text("\n".join(glyph_captions(color, digit)) + "\n")
    return out


# --- reading a digit back from pixels (the independent check of samples) ---------------------

TEMPLATE = (20, 14)  # (height, width) every glyph is compared at


def _normalised(ink: np.ndarray) -> np.ndarray | None:
    """A crop of ink (H, W) in [0, 1] -> its bounding box resized to TEMPLATE, zero mean, unit norm."""
    ys, xs = np.nonzero(ink > 0.3)
    if len(ys) < 4:
        return None
    crop = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    small = Image.fromarray((crop * 255).astype(np.uint8)).resize(
        (TEMPLATE[1], TEMPLATE[0]), Image.Resampling.BILINEAR
    )
    v = np.asarray(small, dtype=np.float32).flatten() / 255
    v = v - v.mean()
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else None


@lru_cache(maxsize=1)
def _templates() -> np.ndarray:
    rows = []
    for d in range(10):
        img = render_glyph(d, "black", 64, 0.7, (0.5, 0.5))
        ink = 1 - np.asarray(img.convert("L"), dtype=np.float32) / 255
        rows.append(_normalised(ink))
    return np.stack(rows)


def read_glyph(image: torch.Tensor) -> dict[str, str] | None:
    """(3, H, W) in [0, 1] -> {"color": ..., "digit": ...} read from the pixels, or None
    when nothing is drawn."""
    pixels = image.detach().float().cpu().numpy()
    bg = np.array(BACKGROUND, dtype=np.float32)[:, None, None] / 255
    ink = np.abs(pixels - bg).max(0)
    vector = _normalised(ink)
    if vector is None:
        return None
    strong = ink > 0.5
    mean = pixels[:, strong if strong.sum() >= 2 else ink > 0.3].mean(-1)
    palette = np.array(list(COLORS.values()), dtype=np.float32) / 255
    color = list(COLORS)[int(((palette - mean) ** 2).sum(-1).argmin())]
    digit = DIGITS[int((_templates() @ vector).argmax())]
    return {"color": color, "digit": digit}


def parse_glyph_caption(caption: str) -> dict[str, str]:
    """'the digit seven in red' -> the attributes it states."""
    words = caption.replace(",", " ").split()
    out = {}
    for w in words:
        if w in COLORS:
            out["color"] = w
        elif w in DIGITS:
            out["digit"] = w
    return out
