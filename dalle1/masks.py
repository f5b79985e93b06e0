"""DALL-E 1's attention masks as boolean ``[query, key]`` matrices (True = may attend).

Paper appendix B.1: text tokens attend to all earlier text tokens; image tokens
attend to *all* text tokens, but only to a sparse set of earlier image tokens.
Three image-to-image patterns are used:

* **row** — the earlier tokens of the query's own row of the grid;
* **column** — the earlier tokens of the query's own column;
* **convolutional** — the earlier tokens in a ``k × k`` window around the query
  (11 × 11 in the paper), used in the last layer only.

Layer ``i`` (1-based, as in the paper) uses the column mask when
``(i - 2) mod 4 == 0`` and the row mask otherwise; the last layer uses the
convolutional mask. ``attention: dense`` keeps plain causal attention everywhere.

Positions here are *input* positions of the stream the transformer reads:
``[<bos>, t_1 … t_L, c_1 … c_{N-1}]`` (length ``L + N``); the last image code is
never an input, because nothing comes after it.
"""

from __future__ import annotations

import torch

KINDS = ("dense", "row", "column", "conv")


def _grid_coords(grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.arange(grid * grid)
    return index // grid, index % grid


def image_mask(kind: str, grid: int, conv_kernel: int = 11) -> torch.Tensor:
    """(grid², grid²) boolean matrix: may image code ``q`` attend image code ``k``? Always causal."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if kind == "conv" and (conv_kernel < 1 or conv_kernel % 2 != 1):
        raise ValueError(f"conv_kernel must be a positive odd number, got {conv_kernel}")
    n = grid * grid
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    row, col = _grid_coords(grid)
    same_row = row[:, None] == row[None, :]
    same_col = col[:, None] == col[None, :]
    if kind == "dense":
        return causal
    if kind == "row":
        return causal & same_row
    if kind == "column":
        return causal & same_col
    if kind == "conv":
        r = conv_kernel // 2
        near = ((row[:, None] - row[None, :]).abs() <= r) & (
            (col[:, None] - col[None, :]).abs() <= r
        )
        return causal & near
    raise ValueError(f"unknown mask kind '{kind}'; expected one of {', '.join(KINDS)}")


def stream_mask(kind: str, text_len: int, grid: int, conv_kernel: int = 11) -> torch.Tensor:
    """(L + N, L + N) boolean mask over the input stream ``[<bos>, text, image[:-1]]``.

    Every position attends causally to every text position (``<bos>`` included);
    image positions attend to earlier image positions through :func:`image_mask`.
    """
    n_text = text_len + 1  # <bos> + L text slots
    n_image = grid * grid - 1  # the last code is never an input
    size = n_text + n_image
    mask = torch.ones(size, size, dtype=torch.bool).tril()
    mask[n_text:, n_text:] = image_mask(kind, grid, conv_kernel)[:n_image, :n_image]
    return mask


def layer_kinds(depth: int, attention: str) -> list[str]:
    """The mask kind of each layer: the paper's schedule for ``dalle``, dense otherwise."""
    if attention == "dense":
        return ["dense"] * depth
    if attention != "dalle":
        raise ValueError(f"attention must be 'dense' or 'dalle', got '{attention}'")
    kinds = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, depth + 1)]
    kinds[-1] = "conv"
    return kinds


def mask_to_bias(mask: torch.Tensor) -> torch.Tensor:
    """Boolean mask -> additive float bias (0 where allowed, -inf where not).

    x-transformers refuses a boolean ``attn_mask`` together with a key/value
    cache, but accepts an additive ``attn_bias``: slicing the rows of this bias
    for the current step keeps the sparse pattern exact during cached decoding.
    """
    bias = torch.zeros(mask.shape, dtype=torch.float32)
    return bias.masked_fill(~mask, float("-inf"))
