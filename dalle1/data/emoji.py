"""A small real captioned dataset: every colour emoji of Noto Color Emoji, named in Unicode.

``dalle1 data emoji OUT --size 64`` renders each fully-qualified emoji sequence
of Unicode's ``emoji-test.txt`` (Debian package ``unicode-data``; skin tones,
ZWJ families, flags and keycaps included) with the Noto Color Emoji font
(Debian package ``fonts-noto-color-emoji``), on white, and writes
``OUT/<codepoints>.png`` next to ``OUT/<codepoints>.txt`` holding its CLDR
name ("thumbs up: medium skin tone") — the folder format, ready to train on.
Without ``emoji-test.txt`` the single code points that Python's ``unicodedata``
names are used instead. The idea follows ru-dalle's "Emojich".

Pillow draws this bitmap font only at its native size of 109 px (with
``embedded_color=True``); the 136×128 glyph box is padded to a square and
resized. Sequences the font (or the text layout) does not shape into one
glyph render blank or as several glyphs side by side: those are skipped.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

FONT_PACKAGE = "fonts-noto-color-emoji"
FONT_PATHS = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",
    "/System/Library/Fonts/NotoColorEmoji.ttf",
)
EMOJI_TEST_PATHS = (
    "/usr/share/unicode/emoji/emoji-test.txt",
    "/usr/share/unicode-data/emoji/emoji-test.txt",
)
NATIVE_SIZE = 109  # the only pixel size of the font's bitmap strikes
GLYPH_WIDTH = 136  # advance of one glyph at that size (the box is 136 x 128)
# code point ranges scanned when emoji-test.txt is absent
FALLBACK_RANGES = ((0x2190, 0x21FF), (0x2300, 0x23FF), (0x2600, 0x27BF), (0x2B00, 0x2BFF))
FALLBACK_RANGES += ((0x1F000, 0x1FAFF),)
FALLBACK_SINGLES = (0x00A9, 0x00AE, 0x203C, 0x2049, 0x2122, 0x2139, 0x3030, 0x303D, 0x3297, 0x3299)


@dataclass
class Emoji:
    sequence: str  # the characters
    name: str  # the caption

    @property
    def stem(self) -> str:
        """File name: the code points in hex, ``_``-joined (variation selectors dropped)."""
        return "_".join(f"{ord(c):x}" for c in self.sequence if ord(c) != 0xFE0F)


def find_font(font_path: str | Path | None = None) -> Path:
    """The Noto Color Emoji font file, or a FileNotFoundError naming the package to install."""
    candidates = [Path(font_path)] if font_path else [Path(p) for p in FONT_PATHS]
    for path in candidates:
        if path.is_file():
            return path
    where = f"'{font_path}'" if font_path else ", ".join(FONT_PATHS)
    raise FileNotFoundError(
        f"Noto Color Emoji font not found at {where}: install the Debian/Ubuntu package "
        f"{FONT_PACKAGE} (apt-get install {FONT_PACKAGE}) or pass --font"
    )


def parse_emoji_test(text: str) -> list[Emoji]:
    """Fully-qualified sequences of an ``emoji-test.txt``, in file order, with their names.

    A data line reads ``1F44D 1F3FD ; fully-qualified # 👍🏽 E1.0 thumbs up: medium skin tone``.
    """
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#") or ";" not in line:
            continue
        points, rest = line.split(";", 1)
        status, _, comment = rest.partition("#")
        if status.strip() != "fully-qualified":
            continue
        sequence = "".join(chr(int(p, 16)) for p in points.split())
        words = comment.strip().split(" ", 2)  # emoji, version "E1.0", name
        if len(words) < 3:
            continue
        out.append(Emoji(sequence, words[2].strip()))
    return out


def fallback_emoji() -> list[Emoji]:
    """Single code points in the emoji blocks that ``unicodedata`` names (lowercased)."""
    points = list(FALLBACK_SINGLES)
    for first, last in FALLBACK_RANGES:
        points.extend(range(first, last + 1))
    out = []
    for cp in points:
        name = unicodedata.name(chr(cp), "")
        if name:
            out.append(Emoji(chr(cp), name.lower()))
    return out


def emoji_list(test_path: str | Path | None = None) -> list[Emoji]:
    """The emoji to render: ``emoji-test.txt`` when present, else the unicodedata fallback."""
    paths = [Path(test_path)] if test_path else [Path(p) for p in EMOJI_TEST_PATHS]
    for path in paths:
        if path.is_file():
            return parse_emoji_test(path.read_text(encoding="utf-8"))
    return fallback_emoji()


def render_emoji(font: ImageFont.FreeTypeFont, sequence: str, size: int) -> Image.Image | None:
    """One emoji on white at ``size`` px, or None when the font does not shape it as one glyph."""
    left, top, right, bottom = font.getbbox(sequence)
    width, height = right - left, bottom - top
    if width <= 0 or height <= 0 or width > 1.2 * GLYPH_WIDTH:
        return None  # nothing drawn, or several glyphs side by side (sequence not ligated)
    side = max(width, height)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text(
        ((side - width) // 2 - left, (side - height) // 2 - top),
        sequence,
        font=font,
        embedded_color=True,
    )
    if not np.asarray(canvas)[..., 3].any():
        return None  # blank render: the font has no glyph for it
    white = Image.new("RGBA", canvas.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, canvas).convert("RGB")
    return image.resize((size, size), Image.Resampling.LANCZOS)


def make_emoji_dataset(
    out: str | Path,
    size: int = 64,
    font_path: str | Path | None = None,
    test_path: str | Path | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> int:
    """Render the emoji set into ``out`` (folder format); returns how many were written."""
    if size < 1:
        raise ValueError(f"--size must be >= 1, got {size}")
    font = ImageFont.truetype(str(find_font(font_path)), NATIVE_SIZE)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = emoji_list(test_path)
    written = 0
    for item in tqdm(items, desc="rendering emoji", disable=not progress):
        if limit is not None and written >= limit:
            break
        image = render_emoji(font, item.sequence, size)
        if image is None:
            continue
        image.save(out / f"{item.stem}.png")
        (out / f"{item.stem}.txt").write_text(item.name + "\n", encoding="utf-8")
        written += 1
    if written == 0:
        raise ValueError(f"the font rendered none of the {len(items)} emoji")
    return written
