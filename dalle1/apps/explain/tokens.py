"""Pictures of the image tokenizer, the discrete VAE (paper section 2.1).

* :func:`reconstructions_picture` — originals above ``decode(encode(x))``, with PSNR;
* :func:`codebook_picture` — every code decoded to its pixel tile, most used first;
* :func:`codes_picture` — one image with its code ids laid over it, its
  reconstruction and the reconstruction error of each code's cell;
* :func:`codebook_usage_picture` — how often each code is used (a bar chart).

"Bits per code" is log2 of the codebook size: what one code can say (the paper:
log2 8192 = 13 bits, 1024 codes = 13,312 bits for a 256×256 image, against
1,572,864 bits of 8-bit RGB).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib import patheffects
from PIL import Image

from ...vae import DiscreteVAE, codebook_usage, psnr
from .figures import (
    FUTURE,
    IMAGE_COLOR,
    Mosaic,
    axes_px,
    ceil_scale,
    finish,
    hex_color,
    mosaic,
    new_figure,
    title,
    to_rgb_array,
)


def tokenizer_numbers(vae: DiscreteVAE) -> str:
    """One line: image size, grid, codebook and what that means in bits."""
    size, grid, k = vae.cfg.image_size, vae.grid_size, vae.codebook_size
    bits = math.log2(k)
    return (
        f"{size}×{size} px -> {grid}×{grid} = {grid * grid} codes of {k} "
        f"({bits:.0f} bits per code, {grid * grid * bits:,.0f} bits per image "
        f"vs {size * size * 24:,} bits of 8-bit RGB)"
    )


@torch.no_grad()
def reconstruct(vae: DiscreteVAE, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, reconstructions) of images (B, 3, H, W) in [0, 1]."""
    device = next(vae.parameters()).device
    codes = vae.encode(images.to(device))
    return codes.cpu(), vae.decode(codes).cpu()


def reconstructions_picture(
    vae: DiscreteVAE, images: torch.Tensor, scale: int | None = None
) -> Mosaic:
    """Originals (top row) above their reconstructions ``decode(encode(x))``, PSNR under each."""
    images = images.cpu()
    _, recon = reconstruct(vae, images)
    each = [psnr(r, x) for r, x in zip(recon, images)]
    scale = scale or ceil_scale(64, vae.cfg.image_size, cap=8)
    return mosaic(
        [[to_rgb_array(x) for x in images], [to_rgb_array(r) for r in recon]],
        "dVAE reconstructions: decode(encode(x)) (paper §2.1)",
        [
            tokenizer_numbers(vae),
            f"PSNR of the {len(images)} images: {psnr(recon, images):.1f} dB "
            "(higher is better; 10·log10(1 / mean squared error), pixels in [0, 1])",
        ],
        scale=scale,
        row_labels=["original", "reconstruction"],
        captions=[[""] * len(images), [f"{p:.1f} dB" for p in each]],
    )


# --- the codebook ------------------------------------------------------------------------


@torch.no_grad()
def codebook_tiles(vae: DiscreteVAE, batch: int = 256) -> torch.Tensor:
    """Each code's pixel tile: (K, 3, px, px), px = image_size / grid.

    Code ``c``'s tile is the centre cell of ``decode(a grid where every cell is c)``: a
    decoder paints each cell from its neighbours too, so a grid of one code shows
    what that code draws on its own.
    """
    grid, size = vae.grid_size, vae.cfg.image_size
    px = size // grid
    r0 = (grid // 2) * px
    device = next(vae.parameters()).device
    tiles = []
    for lo in range(0, vae.codebook_size, batch):
        ids = torch.arange(lo, min(lo + batch, vae.codebook_size), device=device)
        decoded = vae.decode(ids[:, None].expand(-1, grid * grid))
        tiles.append(decoded[:, :, r0 : r0 + px, r0 : r0 + px].cpu())
    return torch.cat(tiles)


def code_counts(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    return torch.bincount(codes.flatten().cpu(), minlength=codebook_size)


def usage_line(codes: torch.Tensor, codebook_size: int, images: int) -> str:
    stats = codebook_usage(codes.cpu(), codebook_size)
    used = int((code_counts(codes, codebook_size) > 0).sum())
    return (
        f"{used} of {codebook_size} codes used on {images} images ({100 * stats['usage']:.0f}%); "
        f"perplexity {stats['perplexity']:.1f}, i.e. {math.log2(stats['perplexity']):.2f} of "
        f"{math.log2(codebook_size):.0f} bits per code used"
    )


CODEBOOK_TILES = 256  # the paper's 8192 codes would not be legible: the most used are shown


def codebook_order(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Code ids, most used first (ties: lower id first)."""
    counts = code_counts(codes, codebook_size)
    return torch.sort(-counts, stable=True).indices


def codebook_picture(
    vae: DiscreteVAE, codes: torch.Tensor, images: int, max_tiles: int = CODEBOOK_TILES
) -> tuple[Mosaic, torch.Tensor]:
    """Every code's tile (:func:`codebook_tiles`), most used first; returns (picture, order).

    Under each tile: its id and how often it was used in ``codes`` (codes of
    ``images`` images); unused codes are framed in grey.
    """
    k = vae.codebook_size
    counts = code_counts(codes, k)
    order = codebook_order(codes, k)[:max_tiles]
    tiles = codebook_tiles(vae)
    cols = 16
    px = vae.cfg.image_size // vae.grid_size
    scale = ceil_scale(28, px, cap=16)
    rows, caps, frames = [], [], []
    for lo in range(0, len(order), cols):
        ids = order[lo : lo + cols].tolist()
        rows.append([to_rgb_array(tiles[i]) for i in ids])
        caps.append([f"#{i}\n{int(counts[i])}×" for i in ids])
        frames.append([None if counts[i] else FUTURE for i in ids])
    shown = "" if len(order) == k else f" (the {len(order)} most used of {k})"
    picture = mosaic(
        rows,
        f"the codebook: each code decoded to its pixel tile, most used first{shown}",
        [
            usage_line(codes, k, images),
            "tile of code c: the centre cell of decode(a grid filled with c); "
            "under it: the code id and how often it is used",
        ],
        scale=scale,
        captions=caps,
        frames=frames,
    )
    return picture, order


# --- one image, its codes and the error of each code ---------------------------------------


@torch.no_grad()
def cell_errors(
    vae: DiscreteVAE, image: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (grid, grid), reconstruction (3, H, W), mean squared error per cell (grid, grid))."""
    codes, recon = reconstruct(vae, image[None])
    grid = vae.grid_size
    px = vae.cfg.image_size // grid
    err = ((recon[0] - image.cpu()) ** 2).mean(0)
    per_cell = err.view(grid, px, grid, px).mean((1, 3))
    return codes[0].view(grid, grid), recon[0], per_cell


def codes_picture(vae: DiscreteVAE, image: torch.Tensor, caption: str = "") -> Image.Image:
    """An image with its code ids written on their cells, the reconstruction and the
    reconstruction error of every code's cell."""
    codes, recon, per_cell = cell_errors(vae, image)
    grid = vae.grid_size
    side = 300
    width, height = 3 * side + 2 * 60 + 160, side + 150
    fig = new_figure(width, height)
    heading = "an image as codes: the id of each cell's code, and what each code loses"
    top = title(
        fig,
        heading,
        [
            (f'caption: "{caption}"; ' if caption else "") + tokenizer_numbers(vae),
            f"PSNR of this reconstruction: {psnr(recon, image.cpu()):.1f} dB; "
            f"worst cell: MSE {float(per_cell.max()):.4f}",
        ],
    )
    top += 24
    panels = [
        ("the image and its code ids", to_rgb_array(image)),
        ("decode(codes)", to_rgb_array(recon)),
    ]
    for i, (name, array) in enumerate(panels):
        ax = axes_px(fig, (30 + i * (side + 60), top, 30 + i * (side + 60) + side, top + side))
        ax.imshow(array, interpolation="nearest", extent=(0, grid, grid, 0))
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(grid + 1) if grid <= 16 else [0, grid])
        ax.set_yticks(range(grid + 1) if grid <= 16 else [0, grid])
        ax.tick_params(labelsize=7)
        ax.set_xlabel("code column", fontsize=8)
        ax.set_ylabel("code row", fontsize=8)
        ax.grid(True, color="white", linewidth=0.6, alpha=0.7)
        if i == 0 and grid <= 16:
            for r in range(grid):
                for c in range(grid):
                    ax.text(
                        c + 0.5,
                        r + 0.5,
                        str(int(codes[r, c])),
                        ha="center",
                        va="center",
                        fontsize=max(5, 11 - grid // 3),
                        color="white",
                        path_effects=[patheffects.withStroke(linewidth=2, foreground="black")],
                    )
    x0 = 30 + 2 * (side + 60)
    ax = axes_px(fig, (x0, top, x0 + side, top + side))
    shown = ax.imshow(
        per_cell.numpy(), cmap="magma", interpolation="nearest", extent=(0, grid, grid, 0)
    )
    ax.set_title("reconstruction error of each code's cell", fontsize=10)
    ax.set_xticks(range(grid + 1) if grid <= 16 else [0, grid])
    ax.set_yticks(range(grid + 1) if grid <= 16 else [0, grid])
    ax.set_xlabel("code column", fontsize=8)
    ax.set_ylabel("code row", fontsize=8)
    ax.tick_params(labelsize=7)
    cax = axes_px(fig, (x0 + side + 12, top, x0 + side + 26, top + side))
    bar = fig.colorbar(shown, cax=cax)
    bar.set_label("mean squared error of the cell (pixels in [0, 1])", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return finish(fig, heading)


# --- how often each code is used -----------------------------------------------------------


def codebook_usage_picture(codes: torch.Tensor, codebook_size: int, images: int) -> Image.Image:
    """Bar chart of code frequencies, codes ranked from most to least used (log axis)."""
    counts = code_counts(codes, codebook_size)
    ranked = torch.sort(counts, descending=True).values.numpy()
    fig = new_figure(760, 380)
    heading = "codebook usage: how often each code is used, most used first"
    top = title(fig, heading, [usage_line(codes, codebook_size, images)])
    ax = axes_px(fig, (80, top + 10, 740, 380 - 50))
    used = ranked > 0
    x = np.arange(1, codebook_size + 1)
    ax.bar(x[used], ranked[used], width=1.0, color=hex_color(IMAGE_COLOR), linewidth=0)
    ax.set_yscale("log")
    ax.set_xlim(0.5, codebook_size + 0.5)
    ax.set_xlabel("rank of the code (1 = most used); codes right of the last bar are unused")
    ax.set_ylabel(f"uses in {images} images")
    ax.grid(True, axis="y", which="major", alpha=0.3)
    return finish(fig, heading)
