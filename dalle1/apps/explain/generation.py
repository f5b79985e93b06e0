"""Pictures of generation: raster-order sampling, its knobs, reranking and editing.

* :func:`raster_frames` / :func:`save_gif` — a sample drawn code by code in raster
  order (paper sections 2.2 and 2.6), with the caption and a step counter;
* :func:`guidance_sweep` — the same seeds at classifier-free guidance scales 1 … 6
  (not in the paper: dalle1's ``cond_scale``);
* :func:`sampling_sweep` — the same seeds under several temperatures and top-k;
* :func:`rerank_picture` — many candidates for one caption in score order, the kept
  ones framed (section 2.6: the paper reranks with CLIP);
* :func:`edit_picture` — an edit: the input, which cells are repainted, kept before
  and kept after the region, and the candidates with their kept-suffix scores
  (:func:`dalle1.editing.sample_edits`).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ...editing import cells_to_pixels, kept_suffix
from ...images import tensor_to_pil
from ...pipeline import DALLEPipeline
from ...sampling import SamplingOptions
from ...vae import DiscreteVAE
from .figures import (
    BACKGROUND,
    CURRENT,
    INK,
    KEPT_COLOR,
    REPAINT_COLOR,
    SUFFIX_COLOR,
    UNSAMPLED,
    Mosaic,
    ceil_scale,
    font,
    mosaic,
    to_rgb_array,
)

# =========================================================================================
# Raster order, as an animation
# =========================================================================================

HEADER_H = 52  # the caption and the step counter above each frame
MIN_FRAME_W = 380


def frame_geometry(image_size: int, scale: int) -> tuple[int, int, int]:
    """(frame width, frame height, x offset of the image) of a raster-order frame."""
    side = image_size * scale
    width = max(side, MIN_FRAME_W)
    return width, HEADER_H + side, (width - side) // 2


def raster_frames(
    vae: DiscreteVAE,
    codes: torch.Tensor,
    caption: str = "",
    scale: int | None = None,
    max_frames: int = 200,
) -> list[Image.Image]:
    """Frames of one sample being generated in raster order: codes (N,) -> N+1 frames at most.

    Frame ``t`` decodes the grid whose first ``t`` codes are the sample's and the
    rest a placeholder (code 0), then paints the unsampled cells grey and
    outlines code ``t`` (the one just drawn) in red. Above the image: the caption
    and "step t / N" with the code just drawn. With more than ``max_frames``
    codes, frames are taken every few codes (first and last kept).
    """
    codes = codes.flatten().long().cpu()
    grid, size = vae.grid_size, vae.cfg.image_size
    n = grid * grid
    if codes.numel() != n:
        raise ValueError(f"expected {n} codes for a {grid}x{grid} grid, got {codes.numel()}")
    scale = scale or ceil_scale(192, size)
    steps = list(range(n + 1))
    if len(steps) > max_frames:
        stride = math.ceil(n / (max_frames - 1))
        steps = sorted(set(range(0, n + 1, stride)) | {n})
    prefix = torch.zeros(len(steps), n, dtype=torch.long)
    for f, t in enumerate(steps):
        prefix[f, :t] = codes[:t]
    device = next(vae.parameters()).device
    with torch.no_grad():
        images = torch.cat([vae.decode(chunk.to(device)).cpu() for chunk in prefix.split(64)])
    px = size // grid
    width, height, x0 = frame_geometry(size, scale)
    shown = caption if len(caption) <= 36 else caption[:35] + "…"
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
        frame = Image.new("RGB", (width, height), BACKGROUND)
        frame.paste(pic, (x0, HEADER_H))
        head = ImageDraw.Draw(frame)
        said = f'"{shown}"' if caption else "the empty caption"
        head.text((6, 4), f"raster-order sampling of {said}", fill=INK, font=font(13))
        if t == 0:
            status = f"step 0 / {n}: the caption is read, no code yet"
        else:
            r, k = divmod(t - 1, grid)
            status = f"step {t} / {n}: code {int(codes[t - 1])} at row {r + 1}, column {k + 1}"
        head.text((6, 26), status, fill=INK, font=font(12))
        frames.append(frame)
    return frames


def save_gif(
    frames: list[Image.Image],
    path: str | Path,
    ms: int = 60,
    hold_ms: int = 1500,
    title: str = "raster-order sampling",
) -> Path:
    """Write frames as a looping GIF (the title in its comment); the last frame is held."""
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
        comment=title.encode(),
    )
    return path


# =========================================================================================
# The sampling knobs: guidance, temperature, top-k
# =========================================================================================


def image_scale(pipe: DALLEPipeline) -> int:
    return ceil_scale(64, pipe.vae.cfg.image_size, cap=8)


def distinct(codes: torch.Tensor) -> int:
    """How many different code grids there are among the rows of ``codes``."""
    return len({tuple(row) for row in codes.tolist()})


def sweep(
    pipe: DALLEPipeline,
    prompt: str,
    settings: list[tuple[str, SamplingOptions]],
    heading: str,
    lines: list[str],
    seed: int,
    num_images: int,
) -> Mosaic:
    """One row per setting, the same ``num_images`` seeds in every row."""
    rows, labels = [], []
    for label, options in settings:
        out = pipe(prompt, num_images=num_images, seed=seed, **asdict(options))
        rows.append([to_rgb_array(p) for p in out.pixels])
        labels.append(f"{label} ({distinct(out.codes)}/{num_images} distinct)")
    return mosaic(
        rows,
        heading,
        lines,
        scale=image_scale(pipe),
        row_labels=labels,
        col_labels=[f"seed {seed + i}" for i in range(num_images)],
    )


GUIDANCE_SCALES = (1, 2, 3, 4, 5, 6)


def guidance_sweep(
    pipe: DALLEPipeline,
    prompt: str,
    seed: int = 0,
    scales: tuple[float, ...] = GUIDANCE_SCALES,
    num_images: int = 8,
    options: SamplingOptions = SamplingOptions(),
) -> Mosaic:
    """The same seeds at every guidance scale: logits = uncond + s · (cond − uncond)."""
    p_uncond = pipe.config.dalle.p_uncond
    lines = [
        f'caption: "{prompt}"; one row per guidance scale s, the same seeds in every column; '
        f"temperature {options.temperature}, top-k {options.top_k or 'off'}",
        "classifier-free guidance (not in the paper): logits = uncond + s·(cond − uncond), where "
        "uncond reads the empty caption (all pads)",
        f"the model learned the empty caption from caption dropout, dalle.p_uncond = {p_uncond}"
        + ("" if p_uncond > 0 else ": 0, so guidance has nothing to go on here"),
    ]
    settings = [
        (
            f"s = {s:g}" + (" (off)" if s == 1 else ""),
            SamplingOptions(**{**asdict(options), "cond_scale": s}),
        )
        for s in scales
    ]
    return sweep(
        pipe, prompt, settings, "classifier-free guidance: scales 1 to 6", lines, seed, num_images
    )


def sampling_settings(
    image_vocab: int, options: SamplingOptions
) -> list[tuple[str, SamplingOptions]]:
    """Temperatures 0.5 / 1 / 1.5 (top-k off), then top-k 1 / K/16 / K/4 at temperature 1."""
    base = {**asdict(options), "top_k": None, "top_p": None}
    out = [
        (
            f"temperature {t:g}" + (" (paper)" if t == 1 else ""),
            SamplingOptions(**{**base, "temperature": t}),
        )
        for t in (0.5, 1.0, 1.5)
    ]
    for k in sorted({1, max(2, image_vocab // 16), max(3, image_vocab // 4)}):
        out.append((f"top-k {k}", SamplingOptions(**{**base, "temperature": 1.0, "top_k": k})))
    return out


def sampling_sweep(
    pipe: DALLEPipeline,
    prompt: str,
    seed: int = 0,
    num_images: int = 8,
    options: SamplingOptions = SamplingOptions(),
) -> Mosaic:
    """The same seeds under several temperatures and top-k filters (over image codes only)."""
    vocab = pipe.dalle.shape.image_vocab
    lines = [
        f'caption: "{prompt}"; one row per setting, the same seeds in every column; guidance '
        f"{options.cond_scale:g}",
        "temperature divides the logits (lower: sharper, less varied); top-k keeps the k most "
        f"likely of the {vocab} image codes",
        "the paper samples at temperature 1 without a filter; (n/8 distinct) counts different "
        "code grids in the row",
    ]
    settings = sampling_settings(vocab, options)
    return sweep(pipe, prompt, settings, "temperature and top-k", lines, seed, num_images)


# =========================================================================================
# Reranking (paper section 2.6)
# =========================================================================================


def scorer_name(pipe: DALLEPipeline) -> str:
    if pipe.clip is not None:
        return "the contrastive scorer in clip/: cosine of image and caption (higher is better)"
    return (
        "no clip/ in this model folder: the transformer's mean log p(code | caption, earlier "
        "codes), nats per code (higher is better)"
    )


def rerank_picture(
    pipe: DALLEPipeline,
    prompt: str,
    seed: int = 0,
    candidates: int = 32,
    keep: int = 4,
    options: SamplingOptions = SamplingOptions(),
    cols: int = 8,
) -> Mosaic:
    """``candidates`` samples of one caption in score order, the best ``keep`` framed."""
    out = pipe(prompt, num_images=candidates, seed=seed, rerank=True, **asdict(options))
    cells = [to_rgb_array(p) for p in out.pixels]
    caps = [f"#{i + 1}: {s:.3f}\nseed {sd}" for i, (s, sd) in enumerate(zip(out.scores, out.seeds))]
    frames = [KEPT_COLOR if i < keep else None for i in range(candidates)]

    def rows_of(items: list) -> list[list]:
        return [items[i : i + cols] for i in range(0, len(items), cols)]

    return mosaic(
        rows_of(cells),
        f"reranking: {candidates} candidates in score order, the best {keep} kept",
        [
            f'caption: "{prompt}"; seeds {seed}…{seed + candidates - 1}; guidance '
            f"{options.cond_scale:g}, top-k {options.top_k or 'off'}",
            "score: " + scorer_name(pipe),
            "the paper reranks its samples with CLIP (§2.6; the blog shows the best 32 of 512)",
        ],
        scale=image_scale(pipe),
        captions=rows_of(caps),
        frames=rows_of(frames),
        legend=[(KEPT_COLOR, f"kept: the best {keep} (pipe(..., rerank=True, keep={keep}))")],
    )


# =========================================================================================
# Editing (paper section 3.3)
# =========================================================================================


def centre_box(size: int) -> tuple[int, int, int, int]:
    """The middle half of a ``size``-px square: (x0, y0, x1, y1), x1 / y1 exclusive."""
    return size // 4, size // 4, size - size // 4, size - size // 4


def cell_roles(repaint: torch.Tensor) -> torch.Tensor:
    """Per cell: 0 = kept before the region, 1 = repainted, 2 = kept after it (scored)."""
    roles = repaint.long()
    roles[kept_suffix(repaint)] = 2
    return roles


def roles_raster(image: torch.Tensor, roles: torch.Tensor, grid: int) -> np.ndarray:
    """The image with repainted cells tinted red and the scored kept cells amber."""
    size = image.shape[-1]
    base = to_rgb_array(image).astype(np.float32)
    for role, color in ((1, REPAINT_COLOR), (2, SUFFIX_COLOR)):
        where = cells_to_pixels(roles == role, grid, size).numpy()
        base[where] = 0.4 * base[where] + 0.6 * np.array(color, dtype=np.float32)
    return base.round().astype(np.uint8)


def edit_picture(
    pipe: DALLEPipeline,
    image: torch.Tensor,
    prompt: str,
    box: tuple[int, int, int, int] | None = None,
    seed: int = 0,
    candidates: int = 8,
    options: SamplingOptions = SamplingOptions(),
) -> Mosaic:
    """Repaint ``box`` of ``image`` (3, H, W at the model's size) for ``prompt``; show why."""
    size, grid = pipe.vae.cfg.image_size, pipe.vae.grid_size
    box = tuple(int(v) if float(v).is_integer() else v for v in (box or centre_box(size)))
    out = pipe.edit(
        tensor_to_pil(image), prompt, box=box, candidates=candidates, seed=seed, **asdict(options)
    )
    roles = cell_roles(out.repaint.cpu())
    fitted = torch.from_numpy(np.array(out.original)).permute(2, 0, 1).float() / 255
    top = [to_rgb_array(fitted), roles_raster(fitted, roles, grid)]
    results = [to_rgb_array(p) for p in out.pixels]
    caps = [
        f"#{i + 1}: {s:.2f} nats\nseed {sd}" for i, (s, sd) in enumerate(zip(out.scores, out.seeds))
    ]
    counts = [int((roles == r).sum()) for r in range(3)]
    return mosaic(
        [top, results],
        "editing: repaint a box, keep the rest, rank candidates by the kept codes after it",
        [
            f'caption: "{prompt}"; box {box} (pixels, x1 and y1 exclusive) -> '
            f"{counts[1]} of {grid * grid} cells repainted; seeds {seed}…{seed + candidates - 1}",
            f"sampling runs in raster order: the {counts[0]} kept cells before the region condition "
            f"it, but the {counts[2]} kept cells after it cannot be seen while sampling",
            "so each candidate is scored by Σ log p(kept code | caption, all codes before it) over "
            "those later cells (nats; higher = fits better), best first",
        ],
        scale=image_scale(pipe),
        row_labels=["input, cells", "candidates"],
        col_labels=["input", "cells"],
        captions=[["", ""], caps],
        legend=[
            (REPAINT_COLOR, "repainted cells"),
            (SUFFIX_COLOR, "kept after the region: scored (untinted cells: kept before it)"),
        ],
    )
