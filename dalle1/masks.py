"""DALL-E 1's attention masks: which earlier positions a query may attend (True = may attend).

Paper appendix B.1: text tokens attend to all earlier text tokens; image tokens
attend to *all* text tokens, but only to a sparse set of earlier image tokens.
Figure 11 of the paper draws the image-to-image patterns for 6 text tokens and a
4×4 grid; its caption, sentence by sentence, is what this module implements:

* **row** — "Mask (a) corresponds to row attention in which each image token
  attends to the previous 5 image tokens in raster order. The extent is chosen
  to be 5, so that the last token being attended to is the one in the same
  column of the previous row." Our reading (also ru-dalle's ``get_row_mask``): a
  sliding window of ``grid + 1`` raster positions *counting the query itself*,
  codes ``p - grid … p``. It crosses row ends: the first code of a row sees the
  tail of the row above. (Before this reading, dalle1 used "the earlier codes of
  the query's own row", under which a row's first code saw no image code at all.)
* **column** — mask (b): the query's own column, every earlier row (and itself).
  "To obtain better GPU utilization, we transpose the row and column dimensions
  of the image states when applying column attention, so that we can use mask
  (c) instead of mask (b)": in the transposed order (column by column) a column
  is a contiguous block and the mask is causal inside each block
  (:func:`transposed_column_mask`). Both describe the same attention;
  :mod:`dalle1.attention` computes it in the transposed layout.
* **conv** — "Mask (d) corresponds to a causal convolutional attention pattern
  with wraparound behavior (similar to the row attention) and a 3 × 3 kernel.
  Our model uses a mask corresponding to an 11 × 11 kernel." Our reading: the
  kernel's cells are fixed *raster offsets*, like the row window: the query sees
  the codes up to ``r = kernel // 2`` positions left of it in its row and, in
  each of the ``r`` rows above, the codes up to ``r`` columns left or right of
  its column, where "left of column 0" and "right of the last column" continue
  on the neighbouring row in raster order (that is the wraparound; a grid
  narrower than the kernel wraps further). So code ``p`` sees ``p - d`` for
  ``d`` in ``[0, r]`` and in ``[i·grid − r, i·grid + r]`` for ``i = 1 … r``.
  (ru-dalle's ``get_conv_mask`` offers two other readings: ``v2`` wraps each
  coordinate modulo the grid, so the bottom rows also see the top rows; ``v3``
  clamps at the edges instead of wrapping.)

Row and conv (and dense) are therefore *translation invariant in raster order*:
image code ``q`` may attend image code ``k`` exactly when the distance ``q − k``
is one of the kind's :func:`image_offsets`. Column is too (the offsets are the
multiples of ``grid``).

Layer ``i`` (1-based, as in the paper) uses the column mask when
``(i - 2) mod 4 == 0`` and the row mask otherwise; the last layer uses the
convolutional mask. ``attention: dense`` keeps plain causal attention everywhere.

Positions here are *input* positions of the stream the transformer reads:
``[<bos>, t_1 … t_L, c_1 … c_{N-1}]`` (length ``L + N``); the last image code is
never an input, because nothing comes after it. Everything is computed on the
CPU unless a device is given, so that building a model on the ``meta`` device
never touches these tables.
"""

from __future__ import annotations

import torch

KINDS = ("dense", "row", "column", "conv")
CPU = torch.device("cpu")


def _check(kind: str, grid: int, conv_kernel: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown mask kind '{kind}'; expected one of {', '.join(KINDS)}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if kind == "conv" and (conv_kernel < 1 or conv_kernel % 2 != 1):
        raise ValueError(f"conv_kernel must be a positive odd number, got {conv_kernel}")


def image_offsets(
    kind: str, grid: int, conv_kernel: int = 11, device: torch.device = CPU
) -> torch.Tensor:
    """The raster distances ``d = q − k ≥ 0`` at which image code ``q`` may attend code ``k``.

    Ascending, ``0`` (the query itself) first: row ``0 … grid``; column the multiples
    of ``grid``; conv ``[0, r] ∪ [i·grid − r, i·grid + r]`` for ``i = 1 … r``; dense all.
    """
    _check(kind, grid, conv_kernel)
    d = torch.arange(grid * grid)  # on the CPU: the selection below is data-dependent
    if kind == "dense":
        keep = torch.ones_like(d, dtype=torch.bool)
    elif kind == "row":
        keep = d <= grid  # the query and the grid codes before it: p - grid is right above
    elif kind == "column":
        keep = d % grid == 0  # same column, any earlier row
    else:  # conv, wrapping along the raster order like the row window
        r = conv_kernel // 2
        keep = torch.zeros_like(d, dtype=torch.bool)
        for i in range(r + 1):  # i rows up: columns c - r … c + r (row 0: only c - r … c)
            keep |= (d - i * grid).abs() <= r
    return d[keep].to(device)


def image_allowed(
    kind: str, grid: int, q: torch.Tensor, k: torch.Tensor, conv_kernel: int = 11
) -> torch.Tensor:
    """Broadcast ``q`` against ``k`` (raster indices of image codes): may ``q`` attend ``k``?"""
    d = q - k
    if kind == "dense":
        return d >= 0
    _check(kind, grid, conv_kernel)
    if kind == "row":
        return (d >= 0) & (d <= grid)
    if kind == "column":
        return (d >= 0) & (d % grid == 0)
    offsets = image_offsets(kind, grid, conv_kernel, d.device)
    return torch.isin(d, offsets)


def image_mask(kind: str, grid: int, conv_kernel: int = 11) -> torch.Tensor:
    """(grid², grid²) boolean matrix in raster order: may image code ``q`` attend code ``k``?"""
    _check(kind, grid, conv_kernel)
    index = torch.arange(grid * grid)
    return image_allowed(kind, grid, index[:, None], index[None, :], conv_kernel)


def transpose_order(grid: int, device: torch.device = CPU) -> torch.Tensor:
    """Raster index of the code at each position of the transposed (column-by-column) order."""
    index = torch.arange(grid * grid, device=device)
    return (index % grid) * grid + index // grid


def transposed_column_mask(grid: int) -> torch.Tensor:
    """Figure 11's mask (c): the column mask with the image transposed (columns laid out
    one after the other), where it is causal inside each column's block of ``grid`` codes."""
    order = transpose_order(grid)
    return image_mask("column", grid)[order][:, order]


def allowed(
    kind: str,
    text_positions: int,
    grid: int,
    queries: torch.Tensor,
    keys: torch.Tensor,
    conv_kernel: int = 11,
) -> torch.Tensor:
    """(len(queries), len(keys)) boolean block of the stream mask, for stream positions.

    The first ``text_positions`` stream positions are text (``<bos>`` and the slots),
    the rest image codes in raster order. Text keys are seen by every later position
    (causal); an image key only by image queries that :func:`image_allowed` lets see it.
    """
    q, k = queries[:, None], keys[None, :]
    causal_text = (k < text_positions) & (k <= q)
    image = (q >= text_positions) & (k >= text_positions)
    img = image_allowed(kind, grid, q - text_positions, k - text_positions, conv_kernel)
    return causal_text | (image & img)


def stream_mask(kind: str, text_len: int, grid: int, conv_kernel: int = 11) -> torch.Tensor:
    """(L + N, L + N) boolean mask over the input stream ``[<bos>, text, image[:-1]]``.

    Every position attends causally to every text position (``<bos>`` included);
    image positions attend to earlier image positions through :func:`image_mask`.
    """
    _check(kind, grid, conv_kernel)
    index = torch.arange(text_len + grid * grid)
    return allowed(kind, text_len + 1, grid, index, index, conv_kernel)


def stream_rows(
    kind: str,
    text_len: int,
    grid: int,
    start: int,
    stop: int,
    conv_kernel: int = 11,
    device: torch.device = CPU,
) -> torch.Tensor:
    """Rows ``start … stop-1`` of :func:`stream_mask` against keys ``0 … stop-1``
    (without building the whole matrix): what a chunk of new positions may read."""
    _check(kind, grid, conv_kernel)
    queries = torch.arange(start, stop, device=device)
    keys = torch.arange(stop, device=device)
    return allowed(kind, text_len + 1, grid, queries, keys, conv_kernel)


def key_table(
    kind: str, text_len: int, grid: int, conv_kernel: int = 11, device: torch.device = CPU
) -> tuple[torch.Tensor, torch.Tensor]:
    """For decoding: ``(index (L + N, K), count (L + N,))``; query position ``p`` may attend
    exactly the key positions ``index[p, :count[p]]`` (ascending; the rest is padding).

    Built from :func:`image_offsets` in O((L + N) · K), never as an (L + N)² matrix; on
    the CPU (the sort is data-dependent), then moved to ``device``.
    """
    _check(kind, grid, conv_kernel)
    target, device = device, CPU
    n_text, n_image = text_len + 1, grid * grid - 1
    size = n_text + n_image
    offsets = image_offsets(kind, grid, conv_kernel, device).flip(0)  # far to near
    # text columns: 0 … n_text - 1, seen by every later position
    text_keys = torch.arange(n_text, device=device).expand(size, n_text)
    pos = torch.arange(size, device=device)
    text_ok = text_keys <= pos[:, None]
    # image columns: the query's raster index minus each offset, where that is an image code
    image_query = (pos - n_text)[:, None]
    image_keys = image_query - offsets[None, :]
    image_ok = (image_query >= 0) & (image_keys >= 0)
    keys = torch.cat([text_keys, image_keys + n_text], 1)
    ok = torch.cat([text_ok, image_ok], 1)
    count = ok.sum(1)
    # move the allowed keys to the front, keeping their (ascending) order
    order = torch.argsort((~ok).to(torch.uint8), dim=1, stable=True)
    index = keys.gather(1, order).masked_fill(
        torch.arange(keys.shape[1], device=device) >= count[:, None], 0
    )
    return index.to(target), count.to(target)


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
