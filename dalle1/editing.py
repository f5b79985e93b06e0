"""Editing existing images: repaint a region, complete from the top rows, make variations.

DALL-E 1 (paper section 3.3 and appendix G / the blog's "image completion" demos) edits an
image by encoding it with the discrete VAE, keeping some of its codes and
sampling the others in raster order with the transformer. The paper primes
with the top 15 of 32 rows, and the blog regenerates rectangles that extend to
the bottom-right corner: in both cases every kept code comes *before* every
sampled one in raster order, so plain sampling is exact.

dalle1 lets the region be any set of code cells (a box anywhere, a mask image,
a random subset), using the sampler's ``keep`` forcing
(:func:`dalle1.sampling.sample_codes`): kept codes are fed to the model as
sampling passes them. That leaves one gap, described in :func:`sample_edits`,
which is closed by sampling several candidates and ranking them by the
likelihood of the kept codes that come after the region.

Region rules (the diffusers convention): a box is ``(x0, y0, x1, y1)`` in
pixels of the input image with ``x1``/``y1`` exclusive (like PIL's crop); in a
mask image white pixels are repainted and black ones kept; a code cell is
repainted if *any* of its pixels is. The input is fitted to the model's square
exactly as :func:`dalle1.images.pil_to_tensor` does (shorter side resized, centre
crop), and regions are mapped through the same transform with exact rational
arithmetic, so a box and a mask covering the same pixels give the same cells.

Compositing: a convolutional decoder smears any change of codes a few pixels
past the changed cells, so by default the input's own pixels are pasted back
outside the repainted cells (optionally with a soft ramp of ``feather`` pixels
*inside* the repainted cells); pixels outside stay bit-identical.

The entry points are :meth:`dalle1.pipeline.DALLEPipeline.edit`, ``complete`` and
``variations``; everything here works on a bare :class:`~dalle1.transformer.DALLE`,
code grids and tensors.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .images import (
    SIXTEEN_BIT,
    ImageInput,
    check_pixels,
    fit_geometry,
    load_input,
    open_input,
    to_rgb,
)
from .sampling import SamplingOptions, sample_codes
from .transformer import DALLE

MaskInput = Image.Image | str | Path | np.ndarray | torch.Tensor
Box = tuple[float, float, float, float]

# paper section 3.3 / figure 4: "the top 15 of 32 rows" of the code grid prime completion
PAPER_PRIME_ROWS = Fraction(15, 32)


# ---------------------------------------------------------------------------
# From pixels of the input to code cells
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """How an input image of ``width`` x ``height`` lands on the model's ``size`` square.

    The geometry of :func:`dalle1.images.pil_to_tensor`, from
    :func:`dalle1.images.fit_geometry`: resize so the shorter side is ``size`` (to
    ``resized_w`` x ``resized_h``), then crop the centre square at (``left``, ``top``).
    """

    width: int
    height: int
    size: int
    resized_w: int
    resized_h: int
    left: int
    top: int

    @classmethod
    def of(cls, width: int, height: int, size: int) -> Frame:
        return cls(width, height, size, *fit_geometry(width, height, size))

    def cell_edges(self, grid: int, axis: str) -> list[tuple[Fraction, Fraction]]:
        """For each column (axis 'x') or row ('y') of cells: its [start, stop) in input pixels."""
        cell = Fraction(self.size, grid)
        offset, ratio = (
            (self.left, Fraction(self.width, self.resized_w))
            if axis == "x"
            else (self.top, Fraction(self.height, self.resized_h))
        )
        return [
            ((i * cell + offset) * ratio, ((i + 1) * cell + offset) * ratio) for i in range(grid)
        ]


def parse_box(box: str | tuple | list) -> Box:
    """'x0,y0,x1,y1' (or four numbers) -> a pixel box; one-line ValueError otherwise."""
    try:
        values = tuple(float(v) for v in (box.split(",") if isinstance(box, str) else box))
    except (TypeError, ValueError):
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"box must be four numbers x0,y0,x1,y1, all finite, got {box!r}")
    return values  # type: ignore[return-value]


def box_to_cells(box: Box, frame: Frame, grid: int) -> torch.Tensor:
    """A pixel box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) -> repainted cells, bool (grid²,).

    A cell is repainted if the box overlaps any of its pixels.
    """
    try:
        x0, y0, x1, y1 = (Fraction(v) for v in box)
    except (TypeError, ValueError, OverflowError):  # OverflowError: inf
        raise ValueError(f"box must be four numbers x0,y0,x1,y1, all finite, got {box!r}") from None
    if x0 >= x1 or y0 >= y1:
        raise ValueError(f"box {tuple(box)} is empty: need x0 < x1 and y0 < y1")
    if x0 < 0 or y0 < 0 or x1 > frame.width or y1 > frame.height:
        raise ValueError(f"box {tuple(box)} extends outside the {frame.width}x{frame.height} image")
    cols = torch.tensor([bool(x0 < b and x1 > a) for a, b in frame.cell_edges(grid, "x")])
    rows = torch.tensor([bool(y0 < b and y1 > a) for a, b in frame.cell_edges(grid, "y")])
    cells = (rows[:, None] & cols[None, :]).flatten()
    if not cells.any():
        raise ValueError(
            f"box {tuple(box)} lies outside the centre square the model sees "
            f"(the image is cropped to {frame.size}x{frame.size})"
        )
    return cells


def mask_pixels(img: Image.Image) -> np.ndarray:
    """A mask image -> bool (H, W): white (more than half the full range) = repaint.

    The full range is the image's own: 16-bit and 32-bit masks are scaled like images
    (:func:`dalle1.images.to_rgb`), not clipped at 255; an alpha channel is ignored.
    """
    if img.mode in SIXTEEN_BIT or img.mode in ("I", "F"):
        return np.asarray(to_rgb(img).convert("L")) > 127
    return np.asarray(img.convert("L")) > 127


def load_mask(mask: MaskInput) -> np.ndarray:
    """A mask image (white = repaint), path, or 2-D array -> bool array (H, W).

    A mask file is read like an image to edit (:func:`dalle1.images.open_input`: checked,
    fully decoded, upright by its EXIF orientation).
    """
    if isinstance(mask, str | Path):
        return mask_pixels(open_input(mask, "mask image"))
    if isinstance(mask, Image.Image):
        check_pixels(mask, "mask image")
        return mask_pixels(ImageOps.exif_transpose(mask))
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"a mask array must be 2-D (H, W), got shape {array.shape}")
    return array > 0.5 if array.dtype != bool else array


def mask_to_cells(mask: MaskInput, frame: Frame, grid: int) -> torch.Tensor:
    """A mask over the input image (white = repaint) -> repainted cells, bool (grid²,)."""
    pixels = load_mask(mask)
    if pixels.shape != (frame.height, frame.width):
        raise ValueError(
            f"mask is {pixels.shape[1]}x{pixels.shape[0]} but the image is {frame.width}x{frame.height}"
        )

    def span(a: Fraction, b: Fraction, limit: int) -> slice:
        # the input pixels [x, x + 1) that overlap [a, b)
        return slice(max(0, math.floor(a)), min(limit, math.ceil(b)))  # exact on Fractions

    cols = [span(a, b, frame.width) for a, b in frame.cell_edges(grid, "x")]
    rows = [span(a, b, frame.height) for a, b in frame.cell_edges(grid, "y")]
    cells = torch.tensor([[bool(pixels[r, c].any()) for c in cols] for r in rows]).flatten()
    if not cells.any():
        raise ValueError("mask selects nothing to repaint inside the square the model sees")
    return cells


def cells_to_pixels(cells: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """Repainted cells (grid²,) -> repainted pixels of the model's square, bool (size, size)."""
    cell = size // grid
    return cells.view(grid, grid).repeat_interleave(cell, 0).repeat_interleave(cell, 1)


def completion_cells(grid: int, rows: int | None = None, start: int | None = None) -> torch.Tensor:
    """Repaint everything from raster position ``start`` (or from row ``rows``) onward.

    ``rows=None`` and ``start=None`` primes with the paper's share of the rows:
    15 of 32 (section 3.3), i.e. ``grid * 15 // 32`` rows.
    """
    n = grid * grid
    if rows is not None and start is not None:
        raise ValueError("give rows= or start=, not both")
    if start is None:
        rows = int(grid * PAPER_PRIME_ROWS) if rows is None else rows
        if not 0 <= rows < grid:
            raise ValueError(
                f"rows must be in [0, {grid - 1}] for a {grid}x{grid} grid, got {rows}"
            )
        start = rows * grid
    if not 0 <= start < n:
        raise ValueError(f"start must be in [0, {n - 1}] for {n} codes, got {start}")
    return torch.arange(n) >= start


def variation_cells(
    grid: int,
    fraction: float = 0.5,
    mode: str = "random",
    seed: int = 0,
) -> torch.Tensor:
    """Cells to re-sample for a variation: a seeded random ``fraction`` of them, or the lower part.

    mode "random": ``round(fraction · grid²)`` cells drawn with ``random.Random(seed)``;
    mode "lower":  the bottom ``round(fraction · grid)`` rows (at least one).
    """
    n = grid * grid
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if mode == "random":
        chosen = random.Random(seed).sample(range(n), max(1, round(fraction * n)))
        cells = torch.zeros(n, dtype=torch.bool)
        cells[chosen] = True
        return cells
    if mode == "lower":
        rows = max(1, round(fraction * grid))
        return completion_cells(grid, rows=grid - rows)
    raise ValueError(f"mode must be 'random' or 'lower', got {mode!r}")


def region_cells(
    image: ImageInput,
    size: int,
    grid: int,
    box: Box | None = None,
    mask_image: MaskInput | None = None,
) -> torch.Tensor:
    """Repainted cells (grid²,) of ``image`` for a pixel ``box`` or a ``mask_image``."""
    if (box is None) == (mask_image is None):
        raise ValueError("give exactly one of box= or mask_image=")
    img = load_input(image)
    frame = Frame.of(img.width, img.height, size)
    return (
        box_to_cells(box, frame, grid)
        if box is not None
        else mask_to_cells(mask_image, frame, grid)
    )


# ---------------------------------------------------------------------------
# Sampling and ranking candidates
# ---------------------------------------------------------------------------


def kept_suffix(repaint: torch.Tensor) -> torch.Tensor:
    """Kept codes that come after the first repainted one in raster order, bool like ``repaint``."""
    index = torch.arange(repaint.shape[-1], device=repaint.device)
    first = torch.where(repaint.any(-1), repaint.float().argmax(-1), repaint.shape[-1])
    return ~repaint & (index > first[..., None])


@torch.no_grad()
def suffix_log_likelihood(
    model: DALLE, text: torch.Tensor, codes: torch.Tensor, repaint: torch.Tensor
) -> torch.Tensor:
    """Σ log p(c_j | caption, c_<j) over the kept codes after the region: (B,), one forward pass."""
    log_probs = model.code_log_likelihood(text, codes)
    return (log_probs * kept_suffix(repaint.expand_as(codes)).to(log_probs)).sum(-1)


@dataclass
class Edits:
    """Candidates best first: codes (n, N), their scores (n,) and the seed of each."""

    codes: torch.Tensor
    scores: torch.Tensor
    seeds: list[int]


@torch.no_grad()
def sample_edits(
    model: DALLE,
    text: torch.Tensor,
    original: torch.Tensor,
    repaint: torch.Tensor,
    *,
    options: SamplingOptions = SamplingOptions(),
    candidates: int = 4,
    seed: int = 0,
    null_text: torch.Tensor | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> Edits:
    """Re-sample the ``repaint`` codes (bool (N,)) of ``original`` (N,) for caption ``text`` (L,).

    Every kept code is forced to its original value as raster sampling passes
    it, so codes after it condition on it exactly (``sample_codes(keep=...)``).
    Candidate ``i`` uses seed ``seed + i``: re-running with ``seed=seed + i,
    candidates=1`` gives that candidate again. Candidates are returned best
    first by their score: the log-likelihood (nats) of the kept codes that come
    after the first repainted code, Σ_j log p(c_j | caption, c_<j), computed
    with one forward pass of the conditional model per batch of candidates.

    Limitation: sampling is in raster order, so a code sampled inside the
    region sees the caption and every code *before* it, but not the kept codes
    that come *after* it (to the right of the region on its rows and
    everything below). For a region that extends to the bottom-right corner
    (the paper's case, section 3.3, and completion from the top rows) nothing
    kept comes after, the sampling is exact and all scores are 0. For any other
    region a candidate may not fit what follows it, e.g. a shape cut off at the
    region's lower edge.

    Remedy: sample ``candidates`` of them and rank by how likely the model
    finds the kept suffix given each candidate: a sample that does not fit its
    surroundings makes the codes after it unlikely. More candidates give a
    better best one (cost: N sampling passes plus one scoring pass each).
    Alternatives: extend the region to the bottom-right corner, or rerank with
    a contrastive image-text scorer as the paper does with CLIP (section 2.6).
    """
    n = model.shape.num_codes
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    if original.shape != (n,) or repaint.shape != (n,):
        raise ValueError(
            f"original codes and repaint mask must have shape ({n},), "
            f"got {tuple(original.shape)} and {tuple(repaint.shape)}"
        )
    device = text.device
    text = text.reshape(1, -1)
    original, repaint = original.to(device), repaint.to(device)
    seeds = [seed + i for i in range(candidates)]
    step = batch_size or candidates
    codes, scores = [], []
    for lo in range(0, candidates, step):
        batch = seeds[lo : lo + step]
        rows = text.expand(len(batch), -1)
        sampled = sample_codes(
            model,
            rows,
            **asdict(options),
            null_text=null_text,
            generators=[torch.Generator(device).manual_seed(s) for s in batch],
            init_codes=original.expand(len(batch), -1),
            keep=(~repaint).expand(len(batch), -1),
            progress=progress,
        )
        codes.append(sampled)
        scores.append(suffix_log_likelihood(model, rows, sampled, repaint))
    all_codes, all_scores = torch.cat(codes), torch.cat(scores)
    order = torch.sort(all_scores, descending=True, stable=True).indices
    return Edits(all_codes[order], all_scores[order], [seeds[int(i)] for i in order])


# ---------------------------------------------------------------------------
# Why an edit may disappoint: say so instead of returning N copies of the input
# ---------------------------------------------------------------------------


class EditWarning(UserWarning):
    """An edit ran, but its candidates or its region make the result doubtful."""


def object_pixels(image: torch.Tensor, threshold: float = 0.25) -> torch.Tensor:
    """Pixels unlike the background: bool (H, W) for an image (3, H, W) in [0, 1].

    The background is the median colour of the border pixels; a pixel belongs to the
    object when one of its channels differs from it by more than ``threshold``. A rough
    reading, made for pictures of objects on a plain ground.
    """
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
    background = border.median(dim=1).values[:, None, None]
    return (image - background).abs().amax(0) > threshold


def edit_warnings(
    original: torch.Tensor,
    repaint_pixels: torch.Tensor,
    codes: torch.Tensor,
    original_codes: torch.Tensor,
    repaint: torch.Tensor,
    near: float = 0.05,
    outside: float = 0.1,
) -> list[str]:
    """Plain-language reasons an edit may not do what was asked (empty list: none found).

    original (3, S, S) the fitted input; repaint_pixels (S, S) bool; codes (n, N) the
    candidates; original_codes (N,); repaint (N,) bool cells.

    * every candidate keeps the region's original codes (the kept codes decide it);
    * the candidates are all the same, or differ in fewer than ``near`` of the repainted
      codes (the model is certain: more guidance or a larger region may move it);
    * more than ``outside`` of the object (:func:`object_pixels`) lies outside the region:
      those parts are kept and steer what is drawn inside.
    """
    notes = []
    repaint = repaint.to(codes.device)
    inside = codes[:, repaint]
    n = len(inside)
    if bool((inside == original_codes.to(codes.device)[repaint]).all()):
        notes.append(
            f"all {n} candidates keep the region as it was: the codes kept around it decide it "
            "(cover the whole object with the region, raise guidance or the temperature)"
        )
    elif n > 1:
        mode = inside.mode(dim=0).values
        differ = (inside != mode).float().mean().item()
        if differ == 0:
            notes.append(f"all {n} candidates are the same image")
        elif differ < near:
            notes.append(
                f"the {n} candidates are nearly identical (they differ in {differ:.0%} of the "
                "repainted codes)"
            )
    obj = object_pixels(original.float().cpu())
    if obj.float().mean() >= 0.01:
        kept = (obj & ~repaint_pixels.cpu().bool()).float().sum() / obj.float().sum()
        if kept > outside:
            notes.append(
                f"the region leaves {kept:.0%} of the object outside it (pixels unlike the "
                "background); those parts are kept and steer the edit: enlarge the region"
            )
    return notes


# ---------------------------------------------------------------------------
# Compositing
# ---------------------------------------------------------------------------


def blend_weights(repaint_pixels: torch.Tensor, feather: int = 0) -> torch.Tensor:
    """Weight of the generated image per pixel (size, size): 0 outside the repainted cells.

    ``feather > 0`` ramps the weight from 1/(feather+1) at the border of the
    region to 1 at ``feather`` pixels inside it (Chebyshev distance); the
    weight outside the region stays exactly 0.
    """
    inside = repaint_pixels.bool()
    if feather < 0:
        raise ValueError(f"feather must be >= 0 pixels, got {feather}")
    if feather == 0 or inside.all():
        return inside.float()
    reach = (~inside).float()[None, None]
    dist = torch.full(inside.shape, float(feather + 1))
    for d in range(1, feather + 1):
        reach = F.max_pool2d(reach, 3, stride=1, padding=1)
        newly = (reach[0, 0] > 0) & inside & (dist == feather + 1)
        if not newly.any() and bool((reach[0, 0] > 0).all()):
            break  # every pixel is reached: a wider feather changes no distance (O(size) steps)
        dist[newly] = float(d)
    return torch.where(inside, dist / (feather + 1), torch.zeros(()))


def composite(
    original: torch.Tensor, generated: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Paste ``original`` (3, H, W) back where ``weights`` (H, W) is 0; blend where it is in (0, 1)."""
    weights = weights.to(generated)
    blend = weights * generated + (1 - weights) * original.to(generated)
    return torch.where(weights == 0, original.to(generated), blend)
