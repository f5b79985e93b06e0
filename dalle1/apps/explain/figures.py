"""What every picture of the tour shares: colours, matplotlib figures and exact rasters.

Charts are drawn with matplotlib's Agg canvas (``FigureCanvasAgg``: no display, no
global pyplot state, so it is safe inside a notebook). Pictures whose *cells* mean
something — an attention mask, a grid of code tiles, a row of samples — are placed
into the rendered figure as an exact raster (one array pixel per picture pixel, no
resampling: :func:`place`), and the axes, ticks and labels are drawn around them. That is
what lets the tests read every cell of a saved picture back and compare it with the
tensor it came from.

Every picture carries its title twice: drawn at the top, and as ``info["title"]``
(written to the PNG's ``Title`` text chunk and the GIF's comment by :func:`save`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from PIL import Image, ImageFont, PngImagePlugin

from ...images import to_uint8

# --- colours (shared by every picture, and by the tests) ----------------------------------

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
BOS_COLOR = (128, 128, 128)
TOKEN_COLOR = (66, 133, 244)  # a BPE token of the caption; a text key in a mask
PAD_COLOR = (251, 188, 5)  # a per-position pad token
IMAGE_COLOR = (52, 168, 83)  # an image code; an image key in a mask
MASK_OFF = (232, 232, 232)  # [query, key] not attended
FUTURE = (250, 250, 250)  # mask fields: later codes, hidden by causality
HIDDEN = (200, 200, 200)  # mask fields: earlier codes the mask hides
QUERY_COLOR = (230, 30, 30)  # mask fields: the query code
UNSAMPLED = (150, 150, 150)  # raster animation: codes not drawn yet
CURRENT = (230, 30, 30)  # raster animation: the code just drawn
KEPT_COLOR = (52, 168, 83)  # reranking: a kept candidate's frame
REPAINT_COLOR = (230, 30, 30)  # editing: repainted cells
SUFFIX_COLOR = (251, 188, 5)  # editing: kept cells after the region (they are scored)

DPI = 100
TITLE_PT = 14
TEXT_PT = 10
LINE_PX = 18  # height of one line of TEXT_PT text


def hex_color(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


@functools.cache
def _renderer():
    return new_figure(10, 10).canvas.get_renderer()


def text_px(s: str, pt: float = TEXT_PT, bold: bool = False) -> int:
    """How wide ``s`` (its longest line) is in pixels at ``pt`` points, as matplotlib draws it."""
    props = FontProperties(size=pt, weight="bold" if bold else "normal")
    widths = [
        _renderer().get_text_width_height_descent(line, props, ismath=False)[0]
        for line in s.split("\n")
    ]
    return math.ceil(max(widths, default=0))


def font(size: int = 12) -> ImageFont.ImageFont:
    """Pillow's built-in font (for the PIL-drawn diagram and the GIF frames)."""
    return ImageFont.load_default(size=size)


def ceil_scale(target: int, size: int, cap: int = 16) -> int:
    """Integer upscale factor so that ``size * factor`` reaches about ``target`` pixels."""
    return max(1, min(cap, math.ceil(target / max(1, size))))


# --- figures in pixels ---------------------------------------------------------------------


def new_figure(width: int, height: int) -> Figure:
    """A white matplotlib figure of exactly ``width`` x ``height`` pixels on the Agg canvas."""
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def text(fig: Figure, x: float, y: float, s: str, **kwargs) -> None:
    """Write ``s`` with its top-left corner at pixel (x, y) of the figure (y downwards)."""
    width, height = fig.canvas.get_width_height()
    kwargs.setdefault("fontsize", TEXT_PT)
    kwargs.setdefault("va", "top")
    fig.text(x / width, 1 - y / height, s, **kwargs)


def title_height(lines: list[str] = ()) -> int:
    """Pixel rows :func:`title` takes for a heading and ``lines`` subtitle lines."""
    return 10 + 28 + LINE_PX * len(lines) + 6


def title(fig: Figure, heading: str, lines: list[str] = ()) -> int:
    """Draw the heading and its subtitle lines at the top; returns the pixel row below them."""
    text(fig, 16, 10, heading, fontsize=TITLE_PT, weight="bold")
    y = 10 + 28
    for line in lines:
        text(fig, 16, y, line, color=hex_color(INK))
        y += LINE_PX
    return title_height(lines)


def axes_px(fig: Figure, box: tuple[float, float, float, float]):
    """An axes filling the pixel box (x0, y0, x1, y1) of the figure (y downwards)."""
    width, height = fig.canvas.get_width_height()
    x0, y0, x1, y1 = box
    return fig.add_axes((x0 / width, 1 - y1 / height, (x1 - x0) / width, (y1 - y0) / height))


def place(fig: Figure, raster: np.ndarray, x0: int, y0: int) -> tuple[int, int, int, int]:
    """Put an (h, w, 3) uint8 raster at pixel (x0, y0), unresampled; returns its box.

    The raster is pasted into the rendered pixels by :func:`finish`, after matplotlib
    has drawn the text and axes (which never cover a raster), so it stays exact.
    """
    h, w = raster.shape[:2]
    if not hasattr(fig, "exact_rasters"):
        fig.exact_rasters = []
    fig.exact_rasters.append((np.ascontiguousarray(raster, dtype=np.uint8), x0, y0))
    return x0, y0, x0 + w, y0 + h


def frame_axes(fig: Figure, box: tuple[int, int, int, int], cols: int, rows: int, pad: int = 3):
    """Transparent axes around a raster of ``cols`` x ``rows`` cells placed at ``box``.

    The axes extend ``pad`` pixels past the raster on every side, and its data limits
    are set so that cell ``(i, j)`` has its centre at data ``(j, i)``: ticks and labels
    then point at cells, and the spines never cover a cell.
    """
    x0, y0, x1, y1 = box
    ax = axes_px(fig, (x0 - pad, y0 - pad, x1 + pad, y1 + pad))
    px_w, px_h = (x1 - x0) / cols, (y1 - y0) / rows
    ax.set_xlim(-0.5 - pad / px_w, cols - 0.5 + pad / px_w)
    ax.set_ylim(rows - 0.5 + pad / px_h, -0.5 - pad / px_h)
    ax.patch.set_alpha(0)
    ax.tick_params(direction="out", labelsize=8)
    return ax


def upscale(array: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour integer upscale of an (h, w, ...) array."""
    return array.repeat(scale, axis=0).repeat(scale, axis=1)


def to_rgb_array(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float image in [0, 1] -> (H, W, 3) uint8, the same values as tensor_to_pil."""
    return to_uint8(image.detach().cpu()).permute(1, 2, 0).numpy()


def finish(fig: Figure, heading: str) -> Image.Image:
    """Render the figure to a PIL image whose ``info["title"]`` is the heading."""
    fig.canvas.draw()
    rgb = np.array(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    for raster, x0, y0 in getattr(fig, "exact_rasters", []):
        h, w = raster.shape[:2]
        rgb[y0 : y0 + h, x0 : x0 + w] = raster[: rgb.shape[0] - y0, : rgb.shape[1] - x0]
    img = Image.fromarray(rgb, "RGB")
    img.info["title"] = heading
    return img


def save(img: Image.Image, path: str | Path) -> Path:
    """Write a PNG with its title in the ``Title`` text chunk."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text("Title", img.info.get("title", ""))
    img.save(path, pnginfo=info)
    return path


# --- a labelled mosaic of equal-sized images -----------------------------------------------


@dataclass
class Mosaic:
    """A picture of images in rows, and where each image landed (pixel boxes, y down)."""

    image: Image.Image
    boxes: list[list[tuple[int, int, int, int] | None]]
    scale: int


GAP = 6  # pixels between two cells of a mosaic (room for a 3-px frame)
FRAME = 3


def mosaic(
    rows: list[list[np.ndarray | None]],
    heading: str,
    lines: list[str] = (),
    *,
    scale: int = 1,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    captions: list[list[str]] | None = None,
    frames: list[list[tuple[int, int, int] | None]] | None = None,
    legend: list[tuple[tuple[int, int, int], str]] = (),
    min_width: int = 560,
) -> Mosaic:
    """Images (h, w, 3 uint8) in rows, each upscaled ``scale`` times, in equal slots.

    ``row_labels`` are written left of each row, ``col_labels`` above the first row,
    ``captions[r][c]`` under an image and ``frames[r][c]`` draws a coloured frame in
    the gap around it; the images themselves are placed unresampled.
    """
    h = max(a.shape[0] for row in rows for a in row if a is not None) * scale
    w = max(a.shape[1] for row in rows for a in row if a is not None) * scale
    widest_caption = max((text_px(c, 8) for row in captions or [] for c in row), default=0)
    w = max(w, widest_caption + 4)  # slot width: the image or its caption, whichever is wider
    ncols = max(len(r) for r in rows)
    left = 16 + (max(text_px(s) for s in row_labels) + 12 if row_labels else 0)
    n_lines = max((len(c.split("\n")) for row in captions or [] for c in row), default=0)
    cap_h = n_lines * 13 + (14 if n_lines else 0)  # captions, then room before the next row
    top0 = title_height(lines) + (LINE_PX if col_labels else 0)
    width = max(
        min_width,
        left + ncols * (w + GAP) + 16,
        text_px(heading, TITLE_PT, bold=True) + 32,
        *(text_px(line) + 32 for line in lines),
    )
    bottom = 10 + (LINE_PX + 6 if legend else 0)
    height = top0 + len(rows) * (h + GAP + cap_h) + bottom
    fig = new_figure(width, height)
    title(fig, heading, list(lines))
    boxes: list[list[tuple[int, int, int, int] | None]] = []
    for r, row in enumerate(rows):
        y0 = top0 + r * (h + GAP + cap_h)
        boxes.append([])
        if row_labels:
            text(fig, 16, y0 + h / 2, row_labels[r], va="center")
        for c, array in enumerate(row):
            x0 = left + c * (w + GAP)
            if array is not None:  # centre a narrower image in its slot
                x0 += (w - array.shape[1] * scale) // 2
            if array is None:
                boxes[r].append(None)
                continue
            big = upscale(array, scale)
            ah, aw = big.shape[:2]
            color = frames[r][c] if frames else None
            if color is not None:
                place(
                    fig,
                    np.full((ah + 2 * FRAME, aw + 2 * FRAME, 3), color, np.uint8),
                    x0 - FRAME,
                    y0 - FRAME,
                )
            boxes[r].append(place(fig, big, x0, y0))
            if captions and captions[r][c]:
                text(fig, x0 + aw / 2, y0 + h + 3, captions[r][c], ha="center", fontsize=8)
    if col_labels:
        for c, label in enumerate(col_labels):
            text(fig, left + c * (w + GAP) + w / 2, top0 - LINE_PX, label, ha="center", fontsize=8)
    if legend:
        legend_row(fig, 16, height - bottom + 4, legend)
    return Mosaic(finish(fig, heading), boxes, scale)


def legend_row(
    fig: Figure, x: int, y: int, entries: list[tuple[tuple[int, int, int], str]]
) -> None:
    """Colour swatches, each followed by its label, left to right from pixel (x, y)."""
    for color, label in entries:
        swatch = np.full((12, 12, 3), color, dtype=np.uint8)
        swatch[[0, -1], :] = swatch[:, [0, -1]] = 120  # a grey outline: white swatches show
        place(fig, swatch, x, y)
        text(fig, x + 18, y - 1, label, fontsize=9)
        x += 18 + text_px(label, 9) + 24


def read_cells(
    img: Image.Image, box: tuple[int, int, int, int], cols: int, rows: int
) -> np.ndarray:
    """The colour at the centre of every cell of a raster placed at ``box``: (rows, cols, 3)."""
    array = np.asarray(img.convert("RGB"))
    x0, y0, x1, y1 = box
    cw, ch = (x1 - x0) / cols, (y1 - y0) / rows
    ys = (y0 + (np.arange(rows) + 0.5) * ch).astype(int)
    xs = (x0 + (np.arange(cols) + 0.5) * cw).astype(int)
    return array[ys][:, xs]
