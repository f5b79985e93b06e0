"""Pictures of DALL-E 1's mechanics, drawn from a trained model folder (Pillow only).

``explain(model_folder, out_dir)`` (or ``dalle1 explain --model FOLDER --out DIR``)
writes one picture per mechanic of the paper (Ramesh et al. 2021):

* ``stream_layout.png`` — the single token stream of section 2.2: ``<bos>``, the
  text slots (BPE tokens, then a pad token *of its own per position*) and the
  grid of image codes in raster order;
* ``mask_layerNN_KIND.png`` — the attention mask of every layer of the configured
  schedule (appendix B.1), one pixel per ``[query, key]`` entry of
  :func:`dalle1.masks.stream_mask`, upscaled by an integer factor (nearest);
  ``mask_kind_KIND.png`` the same for every kind (row, column, conv, dense), so a
  densely trained model still shows the paper's patterns; ``mask_schedule.png``
  an overview with labels and ``mask_fields.png`` what one image code can see on
  the grid under each kind;
* ``raster_order.gif`` — a sample generated code by code in raster order
  (sections 2.2 and 2.6): frame ``t`` decodes the first ``t`` codes with the
  VAE, unsampled cells are grey and the code just drawn is outlined in red;
* ``vae_reconstructions.png`` — originals (top row) and their dVAE round trips
  (bottom row), section 2.1;
* ``codebook_usage.png`` — how often each code of the codebook is used;
* ``loss_curves.png`` / ``vae_loss_curves.png`` — training curves from the CSV
  logs the model folder carries in ``history/`` (text and image cross-entropy
  separately: the 1/8 : 7/8 weighting of section 2.2).

Every picture is also available as a function returning a PIL image, so the
tests (and the tour in ``docs/tour.md``) can check them.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from ..data import find_pairs
from ..data.captions import read_captions
from ..images import load_image, make_grid, tensor_to_pil
from ..masks import KINDS, image_mask, layer_kinds, stream_mask
from ..pipeline import DALLEPipeline
from ..text import TextTokenizer
from ..transformer import StreamShape
from ..vae import DiscreteVAE, codebook_usage

# --- colours (shared by every picture, and by the tests) ----------------------------------

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
BOS_COLOR = (128, 128, 128)
TOKEN_COLOR = (66, 133, 244)  # a BPE token of the caption
PAD_COLOR = (251, 188, 5)  # a per-position pad token
IMAGE_COLOR = (52, 168, 83)  # an image code
MASK_OFF = (245, 245, 245)  # [query, key] not attended
MASK_TEXT = TOKEN_COLOR  # query may attend a text key (<bos> or a text slot)
MASK_IMAGE = IMAGE_COLOR  # query may attend an image key
UNSAMPLED = (150, 150, 150)  # raster animation: codes not drawn yet
CURRENT = (230, 30, 30)  # raster animation: the code just drawn
QUERY_COLOR = (230, 30, 30)  # mask fields: the query code

# --- geometry of the stream-layout picture ----------------------------------------------

MARGIN = 16
TITLE_H = 28  # a line of heading text
CELL_W, CELL_H = 56, 36  # one text slot
CELLS_PER_ROW = 16  # text slots per row before wrapping
STRIP_H = 24  # the 1-D stream strip


def _font(size: int = 12) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _ceil_scale(target: int, size: int, cap: int = 16) -> int:
    """Integer upscale factor so that ``size * factor`` reaches about ``target`` pixels."""
    return max(1, min(cap, math.ceil(target / max(1, size))))


# =========================================================================================
# 1. The token stream (paper section 2.2)
# =========================================================================================


def grid_cell_px(grid: int) -> int:
    """Side in pixels of one image-code cell in the stream-layout picture."""
    return max(8, min(40, 320 // grid))


def text_cell_box(slot: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) of text slot ``slot`` (0 = ``<bos>``) in the layout picture."""
    row, col = divmod(slot, CELLS_PER_ROW)
    x0 = MARGIN + col * CELL_W
    y0 = MARGIN + 2 * TITLE_H + row * CELL_H
    return x0, y0, x0 + CELL_W - 2, y0 + CELL_H - 2


def _text_rows(text_len: int) -> int:
    return math.ceil((text_len + 1) / CELLS_PER_ROW)


def grid_cell_box(index: int, text_len: int, grid: int) -> tuple[int, int, int, int]:
    """Pixel box of image code ``index`` (raster order) in the layout picture."""
    g = grid_cell_px(grid)
    r, c = divmod(index, grid)
    top = MARGIN + 2 * TITLE_H + _text_rows(text_len) * CELL_H + TITLE_H
    x0, y0 = MARGIN + c * g, top + r * g
    return x0, y0, x0 + g - 2, y0 + g - 2


def layout_size(text_len: int, grid: int) -> tuple[int, int]:
    """(width, height) of the stream-layout picture."""
    g = grid_cell_px(grid)
    width = 2 * MARGIN + max(min(text_len + 1, CELLS_PER_ROW) * CELL_W, grid * g, 480)
    height = (
        MARGIN
        + 2 * TITLE_H
        + _text_rows(text_len) * CELL_H
        + TITLE_H
        + grid * g
        + TITLE_H
        + STRIP_H
        + MARGIN
    )
    return width, height


def code_shade(index: int, num_codes: int) -> tuple[int, int, int]:
    """Image-code colour, lighter for earlier raster positions (the sampling order)."""
    f = 0.75 * (1 - index / max(1, num_codes - 1))
    return tuple(round(c + (255 - c) * f) for c in IMAGE_COLOR)


def slot_kinds(text_ids: torch.Tensor, tokenizer: TextTokenizer) -> list[str]:
    """'bos', then 'token' or 'pad' for every text slot of one encoded caption."""
    return ["bos"] + ["pad" if bool(tokenizer.is_pad(i)) else "token" for i in text_ids]


def stream_layout(tokenizer: TextTokenizer, shape: StreamShape, prompt: str) -> Image.Image:
    """The ``[<bos>, t_1 … t_L | c_1 … c_N]`` stream of one caption (paper section 2.2).

    Text slots are blue for BPE tokens and amber for pads (each slot has its own
    pad id, ``pad_i``); the image codes are drawn on their grid, shaded by raster
    index; the bottom strip shows the same stream as the 1-D sequence the
    transformer reads.
    """
    ids = tokenizer.encode(prompt)[0]
    kinds = slot_kinds(ids, tokenizer)
    L, grid, N = shape.text_len, shape.grid, shape.num_codes
    img = Image.new("RGB", layout_size(L, grid), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font, small = _font(13), _font(10)
    draw.text((MARGIN, MARGIN), f'caption: "{prompt}"', fill=INK, font=font)
    n_tokens = sum(k == "token" for k in kinds)
    draw.text(
        (MARGIN, MARGIN + TITLE_H),
        f"text slots: <bos> + {L} positions ({n_tokens} BPE tokens, {L - n_tokens} per-position pads)",
        fill=INK,
        font=font,
    )
    for slot, kind in enumerate(kinds):
        color = {"bos": BOS_COLOR, "token": TOKEN_COLOR, "pad": PAD_COLOR}[kind]
        box = text_cell_box(slot)
        draw.rectangle(box, fill=color)
        if kind == "bos":
            label = "<bos>"
        elif kind == "pad":
            label = f"pad{int(ids[slot - 1]) - tokenizer.bpe_vocab_size}"
        else:
            label = tokenizer.tokenizer.id_to_token(int(ids[slot - 1])) or "?"
            label = label.replace("Ġ", "_")[:7]
        draw.text((box[0] + 4, box[1] + 4), label, fill=BACKGROUND, font=font)
        if slot:
            draw.text((box[0] + 4, box[1] + 20), f"id {int(ids[slot - 1])}", fill=INK, font=small)
    grid_top = grid_cell_box(0, L, grid)[1]
    draw.text(
        (MARGIN, grid_top - TITLE_H + 6),
        f"image: {grid}x{grid} = {N} codes from a codebook of {shape.image_vocab}, raster order",
        fill=INK,
        font=font,
    )
    g = grid_cell_px(grid)
    for j in range(N):
        box = grid_cell_box(j, L, grid)
        draw.rectangle(box, fill=code_shade(j, N))
        if g >= 20:
            draw.text((box[0] + 2, box[1] + 2), str(j + 1), fill=INK, font=small)
    strip_top = grid_top + grid * g + TITLE_H
    draw.text(
        (MARGIN, strip_top - TITLE_H + 6),
        f"the stream the transformer reads: {L + 1 + N} tokens, left to right",
        fill=INK,
        font=font,
    )
    width = img.width - 2 * MARGIN
    total = L + 1 + N
    for p in range(total):
        x0 = MARGIN + p * width // total
        x1 = MARGIN + (p + 1) * width // total - 1
        color = (
            {"bos": BOS_COLOR, "token": TOKEN_COLOR, "pad": PAD_COLOR}[kinds[p]]
            if p <= L
            else code_shade(p - L - 1, N)
        )
        draw.rectangle((x0, strip_top, max(x0, x1), strip_top + STRIP_H - 1), fill=color)
    return img


# =========================================================================================
# 2. Attention masks (paper appendix B.1)
# =========================================================================================


def mask_scale(size: int) -> int:
    """Integer upscale factor of a mask picture: about 256 px wide, never fractional."""
    return _ceil_scale(256, size)


def mask_picture(mask: torch.Tensor, text_positions: int, scale: int = 1) -> Image.Image:
    """One pixel per ``[query, key]`` entry (rows = queries), nearest-upscaled by ``scale``.

    Allowed entries are blue when the key is a text position (``<bos>`` and the
    ``text_positions - 1`` text slots) and green when it is an image code;
    masked entries are near-white (``MASK_OFF``).
    """
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"mask must be a square matrix, got shape {tuple(mask.shape)}")
    m = mask.bool().cpu()
    rgb = torch.tensor(MASK_OFF, dtype=torch.uint8).repeat(*m.shape, 1)
    key_is_text = torch.arange(m.shape[1]) < text_positions
    text = m & key_is_text[None, :]
    image = m & ~key_is_text[None, :]
    rgb[text] = torch.tensor(MASK_TEXT, dtype=torch.uint8)
    rgb[image] = torch.tensor(MASK_IMAGE, dtype=torch.uint8)
    img = Image.fromarray(rgb.numpy(), "RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return img


def picture_to_mask(picture: Image.Image, scale: int) -> torch.Tensor:
    """Inverse of :func:`mask_picture`: read the boolean matrix back (one sample per cell)."""
    array = np.asarray(picture.convert("RGB"))[::scale, ::scale]
    return torch.from_numpy((array != np.array(MASK_OFF, dtype=np.uint8)).any(-1))


def kind_mask(kind: str, shape: StreamShape, conv_kernel: int) -> torch.Tensor:
    """The stream mask of one kind; ``dense`` is plain causal attention."""
    return stream_mask(kind, shape.text_len, shape.grid, conv_kernel)


def mask_schedule_picture(kinds: list[str], shape: StreamShape, conv_kernel: int) -> Image.Image:
    """Every layer's mask side by side, labelled ``layer i: kind`` (thumbnails ≤ 160 px)."""
    size = shape.text_len + shape.num_codes
    scale = max(1, 160 // size)
    thumb = size * scale if size * scale <= 160 else 160
    cols = min(len(kinds), 4)
    rows = math.ceil(len(kinds) / cols)
    pad = 12
    img = Image.new(
        "RGB", (pad + cols * (thumb + pad), pad + rows * (thumb + TITLE_H + pad)), BACKGROUND
    )
    draw = ImageDraw.Draw(img)
    cache: dict[str, Image.Image] = {}
    for i, kind in enumerate(kinds):
        if kind not in cache:
            pic = mask_picture(kind_mask(kind, shape, conv_kernel), shape.text_len + 1, scale)
            cache[kind] = pic.resize((thumb, thumb), Image.Resampling.NEAREST)
        r, c = divmod(i, cols)
        x, y = pad + c * (thumb + pad), pad + r * (thumb + TITLE_H + pad)
        draw.text((x, y + 4), f"layer {i + 1}: {kind}", fill=INK, font=_font(13))
        img.paste(cache[kind], (x, y + TITLE_H))
    return img


def mask_fields_picture(
    shape: StreamShape, conv_kernel: int, query: int | None = None
) -> Image.Image:
    """What one image code may attend on the grid, for each kind (red = the query code).

    Green cells are earlier codes the query sees; grey cells are hidden from it.
    ``query`` defaults to the code in the middle of the grid.
    """
    grid = shape.grid
    q = (grid // 2) * grid + grid // 2 if query is None else query
    cell = max(6, min(24, 192 // grid))
    side = grid * cell
    pad = 12
    img = Image.new(
        "RGB", (pad + len(KINDS) * (side + pad), pad + TITLE_H + side + pad), BACKGROUND
    )
    draw = ImageDraw.Draw(img)
    for k, kind in enumerate(KINDS):
        seen = image_mask(kind, grid, conv_kernel)[q]
        x0, y0 = pad + k * (side + pad), pad + TITLE_H
        draw.text((x0, pad + 4), kind, fill=INK, font=_font(13))
        for j in range(grid * grid):
            r, c = divmod(j, grid)
            color = QUERY_COLOR if j == q else (IMAGE_COLOR if bool(seen[j]) else (215, 215, 215))
            box = (x0 + c * cell, y0 + r * cell, x0 + (c + 1) * cell - 2, y0 + (r + 1) * cell - 2)
            draw.rectangle(box, fill=color)
    return img


# =========================================================================================
# 3. Raster-order sampling (paper section 2.2; sample generation, section 2.6)
# =========================================================================================


@torch.no_grad()
def raster_frames(
    vae: DiscreteVAE, codes: torch.Tensor, scale: int | None = None, max_frames: int = 200
) -> list[Image.Image]:
    """Frames of one sample being generated in raster order: codes (N,) -> N+1 frames at most.

    Frame ``t`` decodes the grid whose first ``t`` codes are the sample's and the
    rest a placeholder (code 0), then paints the unsampled cells grey and
    outlines code ``t`` (the one just drawn) in red. With more than
    ``max_frames`` codes, frames are taken every few codes (first and last kept).
    """
    codes = codes.flatten().long().cpu()
    grid, size = vae.grid_size, vae.cfg.image_size
    n = grid * grid
    if codes.numel() != n:
        raise ValueError(f"expected {n} codes for a {grid}x{grid} grid, got {codes.numel()}")
    scale = scale or _ceil_scale(192, size)
    steps = list(range(n + 1))
    if len(steps) > max_frames:
        stride = math.ceil(n / (max_frames - 1))
        steps = sorted(set(range(0, n + 1, stride)) | {n})
    prefix = torch.zeros(len(steps), n, dtype=torch.long)
    for f, t in enumerate(steps):
        prefix[f, :t] = codes[:t]
    device = next(vae.parameters()).device
    images = torch.cat(
        [vae.decode(chunk.to(device)).cpu() for chunk in prefix.split(64)]
    )  # (F, 3, H, W)
    px = size // grid  # pixels per code
    frames = []
    for image, t in zip(images, steps):
        pic = tensor_to_pil(image).resize((size * scale, size * scale), Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(pic)
        c = px * scale
        for j in range(t, n):
            r, k = divmod(j, grid)
            draw.rectangle((k * c, r * c, (k + 1) * c - 1, (r + 1) * c - 1), fill=UNSAMPLED)
        if t > 0:
            r, k = divmod(t - 1, grid)
            draw.rectangle((k * c, r * c, (k + 1) * c - 1, (r + 1) * c - 1), outline=CURRENT)
        frames.append(pic)
    return frames


def save_gif(
    frames: list[Image.Image], path: str | Path, ms: int = 60, hold_ms: int = 1500
) -> Path:
    """Write frames as a looping GIF; the last frame is held for ``hold_ms``."""
    path = Path(path)
    durations = [ms] * (len(frames) - 1) + [hold_ms]
    # one shared palette (from the first, middle and last frames), no dithering: small files
    strip = Image.new("RGB", (frames[0].width * 3, frames[0].height))
    for i, f in enumerate((frames[0], frames[len(frames) // 2], frames[-1])):
        strip.paste(f.convert("RGB"), (i * frames[0].width, 0))
    palette = strip.quantize(colors=255, method=Image.Quantize.MEDIANCUT)
    frames = [f.convert("RGB").quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
    frames[0].save(
        path,
        save_all=True,
        append_images=frames[1:],
        duration=durations,
        loop=0,
        optimize=True,
        disposal=1,
    )
    return path


# =========================================================================================
# 4. The discrete VAE (paper section 2.1)
# =========================================================================================


def reconstructions_picture(
    vae: DiscreteVAE, images: torch.Tensor, scale: int | None = None
) -> Image.Image:
    """Originals (top row) above their reconstructions ``decode(encode(x))`` (bottom row).

    The picture is :func:`dalle1.images.make_grid` of both rows (2 px white padding),
    nearest-upscaled by ``scale``.
    """
    device = next(vae.parameters()).device
    recon = vae.decode(vae.encode(images.to(device))).cpu()
    grid = make_grid(torch.cat([images.cpu(), recon]), nrow=len(images))
    pic = tensor_to_pil(grid)
    scale = scale or _ceil_scale(64, vae.cfg.image_size, cap=8)
    return pic.resize((pic.width * scale, pic.height * scale), Image.Resampling.NEAREST)


HIST_SIZE = (640, 280)


def codebook_picture(codes: torch.Tensor, codebook_size: int) -> Image.Image:
    """Bar chart of code frequencies, codes ranked from most to least used.

    A healthy tokenizer uses most of its codebook; the title gives the share of
    codes used and the perplexity of the empirical code distribution.
    """
    counts = torch.bincount(codes.flatten().cpu(), minlength=codebook_size).float()
    ranked = counts.sort(descending=True).values
    stats = codebook_usage(codes.cpu(), codebook_size)
    img = Image.new("RGB", HIST_SIZE, BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font(13)
    used = int((counts > 0).sum())
    draw.text(
        (MARGIN, 8),
        f"codebook usage: {used} / {codebook_size} codes used ({100 * stats['usage']:.0f}%), "
        f"perplexity {stats['perplexity']:.1f}",
        fill=INK,
        font=font,
    )
    x0, y0, x1, y1 = MARGIN + 40, TITLE_H + 8, HIST_SIZE[0] - MARGIN, HIST_SIZE[1] - 36
    draw.line((x0, y1, x1, y1), fill=INK)
    draw.line((x0, y0, x0, y1), fill=INK)
    top = float(ranked[0]) or 1.0
    width = x1 - x0
    for i in range(codebook_size):  # bins of codes when the codebook is wider than the plot
        a = x0 + 1 + i * (width - 1) // codebook_size
        b = x0 + 1 + (i + 1) * (width - 1) // codebook_size - 1
        h = float(ranked[i]) / top * (y1 - y0 - 1)
        if h > 0:
            draw.rectangle((a, y1 - 1 - round(h), max(a, b), y1 - 1), fill=IMAGE_COLOR)
    draw.text((MARGIN, y0), f"{int(top)}", fill=INK, font=_font(10))
    draw.text((MARGIN, y1 - 10), "0", fill=INK, font=_font(10))
    draw.text(
        (x0, y1 + 6),
        "codes ranked by how often they are used (most used left)",
        fill=INK,
        font=font,
    )
    return img


# =========================================================================================
# 5. Training curves (paper section 2.2: 1/8 text loss, 7/8 image loss)
# =========================================================================================

CURVES_SIZE = (640, 360)
CURVE_COLORS = {
    "loss": INK,
    "text_loss": TOKEN_COLOR,
    "image_loss": IMAGE_COLOR,
    "recon_loss": (155, 89, 182),
    "aux_loss": PAD_COLOR,
}


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Lightning's CSVLogger file -> {column: [(step, value), …]} for every loss column."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            step = row.get("step")
            if not step:
                continue
            for key in CURVE_COLORS:
                value = row.get(key)
                if value not in (None, ""):
                    series.setdefault(key, []).append((int(float(step)), float(value)))
    return series


def loss_curves_picture(series: dict[str, list[tuple[int, float]]], title: str) -> Image.Image:
    """Line plot of each logged loss against the optimizer step (one colour per loss)."""
    if not series:
        raise ValueError("no loss column (loss, text_loss, image_loss, recon_loss) in the log")
    img = Image.new("RGB", CURVES_SIZE, BACKGROUND)
    draw = ImageDraw.Draw(img)
    font, small = _font(13), _font(10)
    draw.text((MARGIN, 8), title, fill=INK, font=font)
    x0, y0, x1, y1 = MARGIN + 44, TITLE_H + 24, CURVES_SIZE[0] - MARGIN, CURVES_SIZE[1] - 40
    steps = [s for points in series.values() for s, _ in points]
    values = [v for points in series.values() for _, v in points]
    s_lo, s_hi = min(steps), max(max(steps), min(steps) + 1)
    v_lo, v_hi = min(0.0, min(values)), max(values) or 1.0
    draw.line((x0, y1, x1, y1), fill=INK)
    draw.line((x0, y0, x0, y1), fill=INK)

    def xy(step: int, value: float) -> tuple[float, float]:
        return (
            x0 + (step - s_lo) / (s_hi - s_lo) * (x1 - x0),
            y1 - (value - v_lo) / (v_hi - v_lo) * (y1 - y0),
        )

    for k in range(5):  # y grid with labels
        v = v_lo + (v_hi - v_lo) * k / 4
        y = xy(s_lo, v)[1]
        draw.line((x0 - 3, y, x1, y), fill=(225, 225, 225) if k else INK)
        draw.text((MARGIN, y - 6), f"{v:.3g}", fill=INK, font=small)
    draw.text((x0, y1 + 4), f"step {s_lo}", fill=INK, font=small)
    draw.text((x1 - 60, y1 + 4), f"step {s_hi}", fill=INK, font=small)
    legend_x = x0 + 8
    for key, points in series.items():
        color = CURVE_COLORS[key]
        if len(points) > 1:
            draw.line([xy(s, v) for s, v in points], fill=color, width=2)
        else:
            x, y = xy(*points[0])
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
        draw.rectangle((legend_x, TITLE_H + 4, legend_x + 12, TITLE_H + 14), fill=color)
        draw.text((legend_x + 16, TITLE_H + 2), key, fill=INK, font=small)
        legend_x += 24 + int(draw.textlength(key, font=small))
    draw.text((x0, CURVES_SIZE[1] - 18), "optimizer step", fill=INK, font=small)
    return img


# =========================================================================================
# The whole set
# =========================================================================================


@dataclass
class Explained:
    """What :func:`explain` wrote (name -> file) and what it skipped (name -> reason)."""

    files: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _data_images(
    model: Path, image_size: int, images: list[str | Path] | None, count: int
) -> tuple[torch.Tensor | None, list[str], str]:
    """Images for reconstructions: the given files, else the held-out examples the model
    folder carries (``examples/``), so the pictures do not depend on where it is run."""
    if images:
        paths = [Path(p) for p in images]
        for p in paths:
            if not p.exists():
                raise FileNotFoundError(f"image '{p}' does not exist")
        return torch.stack([load_image(p, image_size) for p in paths]), [], ""
    try:
        pairs = find_pairs(model / "examples")
    except FileNotFoundError:
        return None, [], f"the model folder '{model}' has no examples/ (give images with --images)"
    pairs = pairs[:count]
    captions = [c for _, cap in pairs for c in read_captions(cap)[:1]]
    return torch.stack([load_image(p, image_size) for p, _ in pairs]), captions, ""


@torch.no_grad()
def explain(
    model: str | Path,
    out: str | Path,
    prompt: str | None = None,
    seed: int = 0,
    images: list[str | Path] | None = None,
    num_recon: int = 8,
    num_usage: int = 512,
    all_kinds: bool = True,
    progress: bool = True,
) -> Explained:
    """Draw every picture of the tour for the model folder ``model`` into ``out``.

    prompt:     caption for the stream layout and the raster animation (default:
                the first caption of the model folder's examples, else "a picture").
    images:     image files for the reconstructions (default: the held-out examples
                the model folder carries, ``examples/``).
    num_usage:  how many of those images are encoded for the codebook histogram.
    all_kinds:  also draw every mask kind, not just the configured schedule.
    """
    model = Path(model)
    out = Path(out)
    pipe = DALLEPipeline.from_pretrained(model)
    vae, dalle, tokenizer = pipe.vae, pipe.dalle, pipe.tokenizer
    shape, kernel = dalle.shape, dalle.cfg.conv_kernel
    out.mkdir(parents=True, exist_ok=True)
    result = Explained()
    data, captions, why = _data_images(model, vae.cfg.image_size, images, max(num_recon, num_usage))
    prompt = prompt or (captions[0] if captions else "a picture")
    steps = tqdm(total=7, desc="explain", disable=not progress)

    def save(name: str, img: Image.Image) -> None:
        path = out / name
        img.save(path)
        result.files[name] = path

    save("stream_layout.png", stream_layout(tokenizer, shape, prompt))
    steps.update()

    size = shape.text_len + shape.num_codes
    scale = mask_scale(size)
    kinds = layer_kinds(dalle.cfg.depth, dalle.cfg.attention)
    for i, kind in enumerate(kinds):
        pic = mask_picture(kind_mask(kind, shape, kernel), shape.text_len + 1, scale)
        save(f"mask_layer{i + 1:02d}_{kind}.png", pic)
    if all_kinds:
        for kind in KINDS:
            pic = mask_picture(kind_mask(kind, shape, kernel), shape.text_len + 1, scale)
            save(f"mask_kind_{kind}.png", pic)
    save("mask_schedule.png", mask_schedule_picture(kinds, shape, kernel))
    save("mask_fields.png", mask_fields_picture(shape, kernel))
    steps.update()

    sample = pipe(prompt, num_images=1, seed=seed)
    gif = out / "raster_order.gif"
    save_gif(raster_frames(vae, sample.codes[0]), gif)
    result.files["raster_order.gif"] = gif
    save("sample.png", sample.images[0])
    steps.update()

    if data is None:
        result.skipped["vae_reconstructions.png"] = why
        result.skipped["codebook_usage.png"] = why
    else:
        save("vae_reconstructions.png", reconstructions_picture(vae, data[:num_recon]))
        steps.update()
        codes = torch.cat([vae.encode(chunk) for chunk in data[:num_usage].split(64)])
        save("codebook_usage.png", codebook_picture(codes, vae.codebook_size))
    steps.update()

    for name, log, title in (  # the training logs the model folder carries (history/)
        ("loss_curves.png", model / "history" / "dalle.csv", "transformer training loss"),
        ("vae_loss_curves.png", model / "history" / "vae.csv", "dVAE training loss"),
    ):
        if not log.exists():
            result.skipped[name] = f"no training log at '{log}'"
            continue
        series = read_metrics(log)
        if not series:
            result.skipped[name] = f"no loss column in '{log}'"
            continue
        save(name, loss_curves_picture(series, f"{title} (history/{log.name})"))
    steps.update(2)
    steps.close()
    return result
