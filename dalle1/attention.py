"""DALL-E's sparse attention at the cost of the keys it allows (training and full forward).

A sparse layer (row / column / conv, :mod:`dalle1.masks`) lets an image code read all
the text and a small window of earlier codes. Handing ``scaled_dot_product_attention``
the whole ``(S, S)`` mask would cost as much as dense attention, and more: a mask rules
out the causal kernel, which skips the upper triangle. Instead the image queries are
cut into **blocks** of ``b`` consecutive codes (in the kind's layout) and each block
attends only

    [ all text positions | the image codes any of its queries may see ]

— a small dense problem with a ``(b, K)`` boolean mask. All blocks go to plain
``F.scaled_dot_product_attention`` together, so the work is about ``S · K`` instead of
``S²``, on CPU and GPU alike, and no ``(S, S)`` tensor is ever built.

* **row** (``b = grid``): a block is one grid row; its window of ``grid + 1`` codes per
  query reaches back into the row above, so it reads ``2 · grid`` codes.
* **column** (``b = grid``): computed with the image transposed, as the paper does
  ("we transpose the row and column dimensions of the image states when applying
  column attention", appendix B.1, Figure 11c): a block is one *column*, causal inside,
  and reads only itself.
* **conv** (``b = 2 · grid``): the 11×11 kernel reaches ``5 · grid + 5`` codes back;
  a block reads that reach plus itself.

Because the row and conv masks depend only on the raster distance ``q − k``
(:func:`dalle1.masks.image_offsets`), every block reads the same set of codes relative to
its first one. The first blocks reach before the image: those keys are masked.

Kernels. ``fused=True`` (the default) runs the blocks through SDPA's fused kernel;
``fused=False`` through batched matrix products and a softmax (:class:`_MatmulBlocks`),
which bf16 training on a CPU takes: there the fused kernel's bf16 backward is slow on
small blocks (``DALLE.flash``, docs/benchmarks.md). The products multiply the text keys,
which every image query reads, once for all blocks, and only the image keys per block;
they also take the text queries (causal attention over the text alone), whose gradients
then go straight into the same buffers (:class:`_TextQueries`). With the fused kernel
the text queries are one more call of it.
No gather by index where the layout makes one needless: a row or conv block reads one
run of codes (its *window*), each ``b`` codes after the last block's, so its queries are
a slice, its keys a strided copy of overlapping windows (:func:`_runs`), and the
backward pass adds the windows' key gradients back with a few strided additions instead
of a row-by-row ``index_add_`` (:func:`_add_every`); a column block is a column of the
image, read and written back by a transposing copy.

Memory. Each image key appears in several blocks, so the gathered blocks are copies.
Neither kernel keeps them for the backward pass: :func:`_fused_blocks` keeps only how to
gather them again (the sources ``q, k, v`` are kept anyway), and :class:`_MatmulBlocks`
gathers them again and recomputes the probabilities, as flash attention does. So a
sparse layer keeps what a dense one keeps, ``q, k, v`` and, fused, the attention output
and its softmax statistics, or with the products ``q, k, v`` alone: linear in the number
of codes. Long streams run their blocks in chunks (:func:`_chunks`), which bounds the
copies and the block scores that exist for a moment to a few times the layer's own
keys and queries.

``tests/test_attention.py`` holds every kind to plain masked attention over the whole
stream, forward and gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from .masks import CPU, image_allowed, image_offsets, transpose_order


@dataclass(frozen=True)
class BlockPlan:
    """How one sparse kind is cut into blocks, for ``text`` text positions and a grid.

    The image codes are taken in the kind's *layout* (raster order, or column by column
    for ``column``) and cut into blocks of ``block`` consecutive slots. Block ``j``'s
    queries are the stream positions ``queries[j]``; it reads the stream positions
    ``keys[j]`` (the text first, then the image codes any of its queries may see) under
    ``mask[j]``. Positions past the end of a shorter stream are redirected at run time
    (:func:`_redirect`).
    """

    kind: str
    text: int  # T: stream positions before the image (<bos> and the text slots)
    grid: int
    block: int  # b: image queries per block
    queries: torch.Tensor  # (blocks, b) long
    keys: torch.Tensor  # (blocks, K) long
    mask: torch.Tensor  # (blocks, b, K) bool: may query i of block j attend key k?
    # row and conv: block j reads the image codes j·b + window … j·b + window + K - T - 1
    # (a run: the allowed offsets leave no gap); None for column
    window: int | None = None
    # the mask as an additive bias (blocks, 1, b, K), one per dtype, made on first use
    biases: dict = field(default_factory=dict, compare=False, repr=False)

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """``mask`` as an additive bias in ``dtype``, made once for every layer and step
        (both kernels add it). Given the boolean mask, SDPA would convert it at each call
        and keep that copy for the backward pass, one per layer (at 48×48 about 9 MB a step
        over the six layers)."""
        if dtype not in self.biases:
            self.biases[dtype] = _bias(self.mask, dtype)[:, None]
        return self.biases[dtype]


def default_block(kind: str, grid: int) -> int:
    """Queries per block: one grid row (a column for ``column``); two rows for conv once
    rows have 8 codes or more: its window reaches five rows back, so a second row of
    queries adds a sixth of the keys, and fewer, larger blocks measured faster on CPU
    with both kernels (bf16, B 4, forward and backward: 57 → 51 ms at grid 32, 179 → 172
    at 48; docs/benchmarks.md)."""
    return grid * (2 if kind == "conv" and grid >= 8 else 1)


def block_plan(
    kind: str,
    text: int,
    grid: int,
    conv_kernel: int = 11,
    device: torch.device = CPU,
    block: int | None = None,
) -> BlockPlan:
    """The plan of a sparse kind (row, column or conv), its tensors on ``device``.

    ``block`` overrides the block size of row and conv (tests use sizes that do not
    divide the grid), which is otherwise :func:`default_block`; a column block is always
    one column. Both kernels take the same plan. Built on the CPU (some
    steps are data-dependent, which the meta device cannot run), then moved.
    """
    plan = _build_plan(kind, text, grid, conv_kernel, block or default_block(kind, grid))
    tensors = ("queries", "keys", "mask")
    moved = {name: getattr(plan, name).to(device) for name in tensors}
    return replace(plan, **moved, biases={})  # biases of its own, on its device


def _build_plan(kind: str, text: int, grid: int, conv_kernel: int, block: int) -> BlockPlan:
    device = CPU  # explicit, so that a torch.device("meta") context never reaches here
    n = grid * grid
    if kind == "column":  # transposed layout: block c is column c and reads itself
        b = grid
        queries = transpose_order(grid, device).view(grid, grid)  # raster index per slot
        image_keys = queries
    elif kind in ("row", "conv"):  # raster layout: block j reads a window before it
        b = block
        blocks = -(-n // b)  # the last block is padded when b does not divide grid²
        queries = torch.arange(blocks * b, device=device).view(blocks, b)
        # the codes any query of a block may see, relative to the block's first code
        offsets = image_offsets(kind, grid, conv_kernel, device)
        relative = (torch.arange(b, device=device)[:, None] - offsets[None, :]).unique()
        image_keys = queries[:, :1] + relative[None, :]
    else:
        raise ValueError(f"no block plan for mask kind '{kind}'")
    blocks = queries.shape[0]
    exists = (image_keys >= 0) & (image_keys < n)  # the first blocks reach before the image
    mask_image = exists[:, None, :] & image_allowed(
        kind, grid, queries[:, :, None], image_keys[:, None, :], conv_kernel
    )
    text_keys = torch.arange(text, device=device).expand(blocks, text)
    keys = torch.cat([text_keys, text + image_keys.clamp(0, n - 1)], 1)
    mask_text = torch.ones(blocks, b, text, dtype=torch.bool, device=device)
    window = None
    if kind != "column" and int(relative[-1] - relative[0]) + 1 == len(relative):
        window = int(relative[0])
    return BlockPlan(
        kind,
        text,
        grid,
        b,
        text + queries,
        keys,
        torch.cat([mask_text, mask_image], 2),
        window,
    )


def _storage(t: torch.Tensor) -> int:
    """Where a tensor's memory starts: the same for a tensor and every view of it."""
    return t.untyped_storage().data_ptr()


def _redirect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Positions past the stream's end (padding of the last block, or codes after a shorter
    prefix) read position 0 instead: they come after every real query in its layout's
    causal order, so no real query's mask lets it see them, and their own outputs are
    dropped."""
    return index.where(index < size, 0)


def _fused_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    lo: int,
    hi: int,
    dropout_p: float,
) -> torch.Tensor:
    """Attention of blocks ``lo … hi-1`` -> ((hi - lo) · b, B, heads · d), in slot order,
    through SDPA's fused kernel, gathered from a stream-first copy
    ``(S, B, heads, d)``: SDPA's batch runs over the blocks and its heads over (sample,
    head), so one ``(blocks, b, K)`` mask serves every sample and head (gathering whole
    rows of a contiguous copy is also about 4x faster on CPU than gathering a transposed
    view)."""
    batch, size, heads, dim = q.shape
    blocks, b, width = hi - lo, plan.block, plan.keys.shape[1]

    def gather(x: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
        index = _redirect(index[lo:hi].flatten(), size)
        rows = x.transpose(0, 1).contiguous().index_select(0, index)
        return rows.view(blocks, length, batch * heads, dim).transpose(1, 2)

    queries = gather(q, plan.queries, b)
    keys, values = gather(k, plan.keys, width), gather(v, plan.keys, width)
    # SDPA keeps its inputs for the backward pass. For the gathered blocks (and views of
    # them) keep only how to gather them again: a key sits in several blocks, and a
    # gather costs far less than keeping the copies.
    recipes = {
        _storage(queries): (q, plan.queries, b),
        _storage(keys): (k, plan.keys, width),
        _storage(values): (v, plan.keys, width),
    }

    def pack(t: torch.Tensor) -> torch.Tensor | tuple:
        recipe = recipes.get(_storage(t))
        return t if recipe is None else (recipe, t.shape, t.stride(), t.storage_offset())

    def unpack(saved: torch.Tensor | tuple) -> torch.Tensor:
        if isinstance(saved, tuple):
            (x, index, length), shape, stride, offset = saved
            with torch.no_grad():
                return gather(x.detach(), index, length).as_strided(shape, stride, offset)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=plan.bias(q.dtype)[lo:hi], dropout_p=dropout_p
        )  # (blocks, B · heads, b, d), laid out as its queries: (blocks, b, B · heads, d)
    return out.transpose(1, 2).reshape(blocks * b, batch, heads * dim)


class _MatmulBlocks(torch.autograd.Function):
    """The blocks as batched matrix products and a softmax (``fused=False``).

    It keeps for the backward pass only ``q, k, v`` as given, and the backward pass
    gathers the blocks again and recomputes their probabilities, as flash attention
    does: kept, the probabilities (``K`` numbers per query and head) would outweigh all
    else the layer keeps. The softmax's backward is torch's own fused one, which needs
    the probabilities and not the output. Under bf16 autocast on a CPU this beats SDPA's
    fused kernel, whose bf16 backward is slow on small blocks (docs/benchmarks.md)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: BlockPlan, lo: int, hi: int, text: bool) -> tuple:
        """-> the image output ``((hi - lo) · b, B, heads · d)``, slot-major (the layout the
        output projection reads, so that the tensor it keeps is this one, not a second
        copy), and with ``text`` the text queries' output ``(B, T, heads · d)`` (else an
        empty tensor): computed here, their gradients go straight into the buffers of
        the image queries' instead of through a kernel of their own and three additions
        of whole-stream gradients."""
        parts = _MatmulParts(q, k, v, plan, lo, hi)
        out = parts.slot_major(parts.forward())
        out_text = _TextQueries(q, k, v, plan.text).forward() if text else q.new_empty(0)
        ctx.save_for_backward(q, k, v)
        ctx.plan, ctx.lo, ctx.hi, ctx.text = plan, lo, hi, text
        return out, out_text

    @staticmethod
    def backward(ctx, grad: torch.Tensor, grad_text: torch.Tensor) -> tuple:
        q, k, v = ctx.saved_tensors
        parts = _MatmulParts(q, k, v, ctx.plan, ctx.lo, ctx.hi)
        dq, dk, dv = parts.backward(parts.heads_first(grad))
        if ctx.text:  # the text queries' share, added at the text positions
            text = _TextQueries(q, k, v, ctx.plan.text)
            for full, part in zip((dq, dk, dv), text.backward(grad_text)):
                full[:, : ctx.plan.text] += part.transpose(1, 2)
        return dq, dk, dv, None, None, None, None


class _TextQueries:
    """The text queries of a sparse layer: causal attention over the text alone, ``(B,
    heads, T, T)`` scores, as two products and a softmax, the probabilities recomputed
    in the backward pass like the blocks'."""

    def __init__(self, q, k, v, text: int):
        self.scale = q.shape[-1] ** -0.5
        self.q, self.k, self.v = (x[:, :text].transpose(1, 2) for x in (q, k, v))
        causal = torch.ones(text, text, dtype=torch.bool, device=q.device).tril()
        self.bias = _bias(causal, q.dtype)

    def probs(self) -> torch.Tensor:
        return torch.baddbmm(
            self.bias, self.q.flatten(0, 1), self.k.flatten(0, 1).transpose(1, 2), alpha=self.scale
        ).softmax(-1)

    def forward(self) -> torch.Tensor:
        """-> ``(B, T, heads · d)``."""
        batch, heads, T, dim = self.q.shape
        out = self.probs() @ self.v.flatten(0, 1)
        return out.view(batch, heads, T, dim).transpose(1, 2).reshape(batch, T, heads * dim)

    def backward(self, grad: torch.Tensor) -> tuple:
        """Gradients of the text positions' ``q, k, v``, each ``(B, heads, T, d)``."""
        batch, heads, T, dim = self.q.shape
        dtype = self.v.dtype

        def heads_first(x: torch.Tensor) -> torch.Tensor:  # (B, T, heads · d) -> (B·heads, T, d)
            return x.view(batch, T, heads, dim).transpose(1, 2).reshape(batch * heads, T, dim)

        grad = heads_first(grad.to(dtype))
        q, k, v = (x.flatten(0, 1) for x in (self.q, self.k, self.v))
        probs = self.probs()
        dv = probs.transpose(1, 2) @ grad
        ds = torch._softmax_backward_data(grad @ v.transpose(1, 2), probs, -1, dtype)
        dq, dk = (ds @ k).mul_(self.scale), (ds.transpose(1, 2) @ q).mul_(self.scale)
        return tuple(x.view(batch, heads, T, dim) for x in (dq, dk, dv))


class _MatmulParts:
    """Blocks ``lo … hi-1`` of ``q, k, v`` ``(B, S, heads, d)``, heads first, with two
    groups of keys: the text ``(B, heads, T, d)``, which every image query reads whole,
    multiplied once for all blocks; and each block's image keys ``(B, heads, blocks,
    K - T, d)`` against its queries ``(B, heads, blocks, b, d)``. The products against
    both groups are written side by side into one ``(…, b, K)`` tensor
    (:meth:`_side_by_side`), so that each block's softmax and its backward are one pass.
    The queries are kept scaled by ``1/√d``, which scales the scores (and ``dk``) for the
    cost of one pass over the queries instead of one over the scores.

    How the blocks are read (and their gradients written back) follows the plan: row and
    conv blocks as windows of the stream (:meth:`_read_windows`), column blocks as the
    transposed image (:meth:`_read_columns`), any other plan by index
    (:meth:`_read_gathered`)."""

    def __init__(self, q, k, v, plan: BlockPlan, lo: int, hi: int):
        self.shape, self.blocks, self.b = q.transpose(1, 2).shape, hi - lo, plan.block
        self.lo, self.window, self.grid = lo, plan.window, plan.grid
        self.scale, self.text = q.shape[-1] ** -0.5, plan.text
        self.columns = plan.kind == "column"
        if self.columns:
            kh, vh = self._read_columns(q, k, v)
        elif self.window is None:
            kh, vh = self._read_gathered(q, k, v, plan)
        else:
            kh, vh = self._read_windows(q, k, v, plan.keys.shape[1] - self.text)
        self.text_k, self.text_v = kh[:, :, : self.text], vh[:, :, : self.text]
        # the image keys' part (the text part of the mask is all True), (blocks, b, K - T)
        self.bias = plan.bias(self.q.dtype)[lo:hi, 0, :, self.text :]

    def _read_columns(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """Column: block ``c`` is image column ``c``, read by a transposing copy. Sets the
        blocks' queries, keys and values; returns the heads-first keys and values."""
        qh, kh, vh = (_padded(x, 0, self.text + self.grid**2) for x in (q, k, v))
        columns = [self._transposed(x)[:, :, self.lo : self.lo + self.blocks] for x in (qh, kh, vh)]
        # contiguous copies (an element-wise product would keep the transposed layout)
        self.q, self.k, self.v = (x.contiguous() for x in columns)
        self.q.mul_(self.scale)
        return kh, vh

    def _read_gathered(self, q, k, v, plan: BlockPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Any plan: the blocks' rows gathered by index (:meth:`_scatter` writes back)."""
        size, lo, hi = q.shape[1], self.lo, self.lo + self.blocks
        self.q_index = _redirect(plan.queries[lo:hi].flatten(), size)
        self.k_index = _redirect(plan.keys[lo:hi, self.text :].flatten(), size)
        qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # (B, heads, S, d)
        self.q = self._rows(qh, self.q_index).mul_(self.scale)
        self.k, self.v = self._rows(kh, self.k_index), self._rows(vh, self.k_index)
        return kh, vh

    def _read_windows(self, q, k, v, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row, conv: the queries a slice, the keys windows of ``width`` codes, of a
        zero-padded heads-first copy (:meth:`_slots` and :meth:`_windows` write back)."""
        T, b = self.text, self.b
        first = T + self.lo * b + self.window  # stream position of window 0's row 0
        end = max(T + (self.lo + self.blocks) * b, first + (self.blocks - 1) * b + width)
        qh, kh, vh = (_padded(x, first, end) for x in (q, k, v))
        at = max(0, -first)  # where stream position 0 sits in the padded copies
        start = at + T + self.lo * b
        self.q = self._blocked(qh[:, :, start : start + self.blocks * b] * self.scale)
        self.k, self.v = (
            _runs(x, at + first, self.blocks, b, width).contiguous() for x in (kh, vh)
        )
        return kh[:, :, at:], vh[:, :, at:]

    def _transposed(self, x: torch.Tensor) -> torch.Tensor:
        """The image part of ``x`` ``(B, heads, T + grid², d)`` column by column, ``(B,
        heads, column, row, d)``: a view."""
        return x[:, :, self.text :].unflatten(2, (self.grid, self.grid)).transpose(2, 3)

    def _rows(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x.index_select(2, index).unflatten(2, (self.blocks, -1))

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, heads, blocks, n, ·)`` -> ``(B, heads, blocks · n, ·)``."""
        return x.flatten(2, 3)

    def _blocked(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`_flat`, for ``n = b``."""
        return x.unflatten(2, (self.blocks, self.b))

    def heads_first(self, rows: torch.Tensor) -> torch.Tensor:
        """Slot-major ``(blocks · b, B, heads · d)`` -> ``(B, heads, blocks, b, d)``, a view."""
        batch, heads, _, dim = self.shape
        return rows.view(self.blocks, self.b, batch, heads, dim).permute(2, 3, 0, 1, 4)

    def slot_major(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`heads_first` (a copy)."""
        return x.permute(2, 3, 0, 1, 4).reshape(self.blocks * self.b, self.shape[0], -1)

    def _side_by_side(
        self, rows: torch.Tensor, text: torch.Tensor, image: torch.Tensor, bias=None
    ) -> torch.Tensor:
        """``(…, b, K)``: ``rows @ textᵀ`` then ``rows @ imageᵀ`` (plus ``bias``, the image
        keys' part of the mask, if given) for the rows ``(B, heads, blocks, b, d)`` of each
        block, each product written into its part (:func:`_bmm_into`), in the products'
        dtype: under bf16 autocast they are rounded to bf16 anyway, and float32 here would
        double the bytes of every pass over the scores for no closer result."""
        batch, heads, blocks, b, _ = rows.shape
        out = rows.new_empty(batch, heads, blocks, b, self.text + image.shape[-2])
        flat = out.view(batch * heads, blocks * b, -1)  # the text part: one product per head
        _bmm_into(
            rows.reshape(batch * heads, blocks * b, -1),
            text.flatten(0, 1).transpose(1, 2),
            flat[..., : self.text],
        )
        image_part = out.view(-1, b, out.shape[-1])[..., self.text :]
        _bmm_into(rows.flatten(0, 2), image.flatten(0, 2).transpose(1, 2), image_part, bias)
        return out

    def probs(self) -> torch.Tensor:
        """Softmax of each image query over its text and image keys, (…, b, K) (computed
        in float32 inside the kernel, whatever the dtype)."""
        scores = self._side_by_side(self.q, self.text_k, self.k, self.bias)
        # in place: the softmax reads each row before it writes it, so the scores need no
        # second buffer (the last layer's forward runs on top of all the layers keep)
        return torch.softmax(scores, -1, out=scores)

    def forward(self) -> torch.Tensor:
        """The attention output ``(B, heads, blocks, b, d)``."""
        probs = self.probs()
        text, image = probs[..., : self.text], probs[..., self.text :]
        out = self._blocked(self._flat(text) @ self.text_v)
        return out.add_(image @ self.v)

    def backward(self, grad: torch.Tensor) -> tuple:
        """Gradients for ``q, k, v`` ``(B, S, heads, d)`` from the output's ``(B, heads,
        blocks, b, d)``."""
        dtype, T = self.v.dtype, self.text
        grad, probs = grad.to(dtype).contiguous(), self.probs()
        # key and value gradients per block over all K keys (the operand is the plain
        # transpose of a contiguous tensor, which the products read as is); the text
        # keys' share is summed over the blocks below
        dv = probs.transpose(-1, -2) @ grad
        # dp = grad · [text_v | v]ᵀ side by side, so that the softmax backward,
        # ds = p · (dp − Σ p · dp), is one fused pass over each block's (b, K) scores,
        # written over dp: two (…, b, K) tensors at most, never three. The last layer
        # runs its backward pass first, on top of everything the layers keep, so what it
        # holds here sets the training step's peak.
        dp = self._side_by_side(grad, self.text_v, self.v)
        ds = torch._softmax_backward_data(dp, probs, -1, dtype, grad_input=dp)
        del probs, dp
        dk = ds.transpose(-1, -2) @ self.q  # the scores are (q / √d) kᵀ: the scaled q
        dq = self._flat(ds[..., :T]) @ self.text_k
        dq.add_(self._flat(ds[..., T:] @ self.k)).mul_(self.scale)
        del ds
        parts = [(x[..., :T, :].sum(2), x[..., T:, :]) for x in (dk, dv)]
        return self._write_back(dq, *parts)

    def _write_back(self, dq, dk: tuple, dv: tuple) -> tuple:
        """The gradients of the blocks' queries ``(B, heads, blocks · b, d)`` and of the
        keys and values, each ``(text, image)``, to the stream positions, each ``(B, S,
        heads, d)``, the way the blocks were read."""
        if self.columns:
            kv = [self._columns(image, text) for text, image in (dk, dv)]
            return self._columns(self._blocked(dq)), *kv
        if self.window is None:
            kv = [self._scatter(self._flat(image), self.k_index, text) for text, image in (dk, dv)]
            return self._scatter(dq, self.q_index), *kv
        return self._slots(dq), *(self._windows(image, text) for text, image in (dk, dv))

    def _columns(self, rows: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """Column: a gradient, ``text`` ``(B, heads, T, d)`` (None: zeros) and the columns
        ``rows`` ``(B, heads, blocks, grid, d)``, to the stream positions ``(B, S, heads,
        d)``: each code is in one column, so this is a transposing copy."""
        full = self._zeros(rows, text, self.text + self.grid**2)
        self._transposed(full)[:, :, self.lo : self.lo + self.blocks] = rows
        return full[:, :, : self.shape[2]].transpose(1, 2)

    def _slots(self, rows: torch.Tensor) -> torch.Tensor:
        """Row and conv: the queries' gradient ``(B, heads, blocks · b, d)`` to its stream
        positions, ``(B, S, heads, d)``: slot ``i`` is image code ``lo · b + i``."""
        full = self._zeros(rows)
        first = self.text + self.lo * self.b
        n = min(rows.shape[2], self.shape[2] - first)  # slots past the stream hold no query
        full[:, :, first : first + n] = rows[:, :, :n]
        return full.transpose(1, 2)

    def _windows(self, rows: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Row and conv: a key or value gradient, ``text`` ``(B, heads, T, d)`` and each
        block's window ``rows`` ``(B, heads, blocks, W, d)``, to the stream positions,
        ``(B, S, heads, d)``. A code sits in several windows, so its rows are summed. Not
        with ``index_add_`` (one thread, one row at a time): block ``j``'s window starts
        ``b`` codes after block ``j - 1``'s, so the ``p``-th ``b`` rows of all windows
        tile one run of the stream, and the windows add in ``⌈W / b⌉`` strided additions."""
        full = self._zeros(rows, text)
        b = self.b
        first = self.text + self.lo * b + self.window  # stream position of window 0's row 0
        for p in range(-(-rows.shape[3] // b)):
            _add_every(full, rows[:, :, :, p * b : (p + 1) * b], first + p * b, b, self.text)
        return full.transpose(1, 2)

    def _scatter(self, rows: torch.Tensor, index: torch.Tensor, text=None) -> torch.Tensor:
        """Rows of a gradient back to their stream positions, (B, S, heads, d); a position
        in several blocks sums its rows. ``text``: the gradient of the text positions."""
        return self._zeros(rows, text).index_add_(2, index, rows).transpose(1, 2)

    def _zeros(self, rows: torch.Tensor, text=None, length: int | None = None) -> torch.Tensor:
        """A gradient buffer ``(B, heads, length, d)`` (default: the stream's ``S``) in
        ``rows``' dtype: zeros, the text positions' gradient ``text`` first if given. A
        view of a ``(B, length, heads, d)`` tensor, the layout of the projections the
        gradient flows to, so that no transposing copy follows."""
        batch, heads, size, dim = self.shape
        full = rows.new_zeros(batch, length or size, heads, dim).transpose(1, 2)
        if text is not None:
            full[:, :, : self.text] = text
        return full


def _bmm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, bias=None) -> None:
    """``out = a @ b (+ bias)`` (batched) for an ``out`` that is part of a wider tensor.
    A CPU bf16 product (oneDNN) writes any output stride at no cost, so it goes straight
    there, and adds ``bias`` written there first (``beta = 1``: a pass over the scores
    less than adding it after, and the same numbers for a bias of 0 and -inf); a float32
    one (MKL) falls back to one product per matrix for such an output (row blocks, 32×32,
    B 4: 144 against 6 ms), and to a slower product with ``beta = 1``, so it goes through
    a contiguous result, a copy and an addition."""
    if out.dtype == torch.bfloat16 or out.device.type != "cpu":
        if bias is None:
            torch.bmm(a, b, out=out)
        else:
            out.view(-1, *bias.shape).copy_(bias)
            out.baddbmm_(a, b)
    else:
        out.copy_(torch.bmm(a, b))
        if bias is not None:
            out.view(-1, *bias.shape).add_(bias)


def _bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = may attend) as an additive bias: 0 where allowed, -inf not."""
    bias = torch.zeros(allowed.shape, device=allowed.device, dtype=dtype)
    return bias.masked_fill_(~allowed, -torch.inf)


def _padded(x: torch.Tensor, first: int, end: int) -> torch.Tensor:
    """``x`` ``(B, S, heads, d)`` heads first, ``(B, heads, ·, d)``, holding stream positions
    ``min(first, 0) … max(end, S) - 1``: the positions outside ``[0, S)`` are zeros (a
    window's reach before the image or past the stream's end, which no query may see)."""
    batch, size, heads, dim = x.shape
    before, after = max(0, -first), max(0, end - size)
    out = x.new_empty(batch, heads, before + size + after, dim)
    out[:, :, :before].zero_()
    out[:, :, before + size :].zero_()
    out[:, :, before : before + size] = x.transpose(1, 2)
    return out


def _runs(x: torch.Tensor, start: int, count: int, step: int, width: int) -> torch.Tensor:
    """A view ``(B, heads, count, width, d)`` of ``x`` ``(B, heads, ·, d)``: run ``j`` is
    rows ``start + j · step`` … ``start + j · step + width - 1`` (runs overlap when
    ``width > step``: a copy of them is a block's windows, each ``width`` consecutive rows,
    so it copies in long contiguous pieces)."""
    st = x.stride()
    return x.as_strided(
        (*x.shape[:2], count, width, x.shape[3]),
        (st[0], st[1], step * st[2], st[2], st[3]),
        x.storage_offset() + start * st[2],
    )


def _add_every(full: torch.Tensor, rows: torch.Tensor, start: int, step: int, low: int) -> None:
    """``full[:, :, start + j · step + i] += rows[:, :, j, i]`` (``full`` ``(B, heads, S, d)``,
    ``rows`` ``(B, heads, J, w, d)``, ``w ≤ step``) for the positions in ``[low, S)``; the
    rows outside are a window's reach before the image or past the stream's end, which no
    query may see, so their gradients are zero. One strided addition for the blocks of
    rows wholly inside, one small one for each of the (at most two) that cross an end."""
    size, (blocks, w) = full.shape[2], rows.shape[2:4]
    inside_lo = max(0, -((start - low) // step))  # first j with start + j · step >= low
    inside_hi = min(blocks, (size - w - start) // step + 1)  # past the last j ending <= S
    if inside_hi > inside_lo:
        target = _runs(full, start + inside_lo * step, inside_hi - inside_lo, step, w)
        target += rows[:, :, inside_lo:inside_hi]
    touching_lo = max(0, (low - w - start) // step + 1)  # first j whose rows reach low
    touching_hi = min(blocks, -((start - size) // step))  # past the last j starting < S
    for j in range(touching_lo, touching_hi):
        if inside_lo <= j < inside_hi:
            continue
        at = start + j * step
        a, z = max(0, low - at), min(w, size - at)
        if z > a:
            full[:, :, at + a : at + z] += rows[:, :, j, a:z]


def matmul_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout_p: float
) -> torch.Tensor:
    """Masked attention as two matrix products and a float32 softmax; ``mask`` (True =
    may attend) broadcasts against the scores ``(…, queries, keys)``.

    The dense layers of short streams take it under bf16 autocast on a CPU
    (:func:`dalle1.transformer.dense_attention`), where it beats SDPA's fused kernel,
    whose bf16 backward is slow: the products run in bf16, the softmax in float32;
    scaling, masking and the cast to float32 are one pass (``torch.add``). Autograd keeps
    the (queries, keys) probabilities, which at those lengths is small.
    """
    scores = torch.add(
        _bias(mask, torch.float32), q @ k.transpose(-1, -2), alpha=q.shape[-1] ** -0.5
    )  # float32
    probs = F.dropout(scores.softmax(-1), dropout_p, training=dropout_p > 0)
    return probs.to(v.dtype) @ v


# How many times the stream's own rows the gathered keys of one chunk may hold, and how
# many times the queries' own numbers (S · d per sample and head) the (b, K) scores of
# the matrix products may hold (their backward pass has two such score tensors alive at
# once; SDPA's fused kernel keeps its scores in tiles and is bounded by the keys alone).
# The last layer's backward comes right after the loss, when every layer's activations
# are alive: with 4, its scores stay below the loss's own peak (bf16, grid 32, batch 4:
# 10 put that layer 23 MB above it). Each chunk costs a pass over the gradients of q, k,
# v, so chunks are few: one per layer at grid 32, d 32, except conv through the
# products (two; three at grid 48); they bound the memory of a long stream's blocks.
CHUNK_ROWS = 4
CHUNK_SCORES = 4


def _chunks(
    plan: BlockPlan, blocks: int, size: int, dim: int, products: bool = True
) -> list[tuple[int, int]]:
    """Runs of blocks whose gathered keys hold at most ``CHUNK_ROWS`` times the stream
    and, for the matrix products, whose scores at most ``CHUNK_SCORES`` times its queries
    (head width ``dim``)."""
    width = plan.keys.shape[1]
    per_run = CHUNK_ROWS * size // width
    if products:
        per_run = min(per_run, CHUNK_SCORES * size * dim // (plan.block * width))
    count = -(-blocks // max(1, per_run))
    per_chunk = -(-blocks // count)  # chunks of equal size: the largest sets the peak
    return [(lo, min(lo + per_chunk, blocks)) for lo in range(0, blocks, per_chunk)]


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    dropout_p: float = 0.0,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Attention of queries ``q`` over keys ``k``/values ``v`` under a sparse DALL-E mask.

    ``q, k, v``: ``(B, S, heads, d)`` (the projections' own layout) for stream positions
    ``0 … S-1``: ``plan.text`` text positions, then a prefix of the image codes in raster
    order (``S ≤ T + grid²``). Returns ``project(o)`` for ``o = softmax(q kᵀ/√d + mask) v``
    with the heads merged, ``(B, S, heads · d)`` before ``project``: under the kind's
    stream mask, the same as masked dense attention.

    ``project`` (a row-wise map such as the output projection, default none) is applied
    piece by piece, so that the attention output SDPA keeps for its backward pass is
    also what the projection keeps: no second copy of it exists.
    """
    batch, size, heads, dim = q.shape
    T = plan.text
    project = project or (lambda rows: rows)
    m = size - T  # image codes present
    # the products (no attention dropout) compute the text queries with the first blocks
    matmul = not fused and dropout_p == 0 and m > 0
    text = []
    if not matmul:  # the text queries: causal attention over the text alone
        qt, kt, vt = (x[:, :T].transpose(1, 2) for x in (q, k, v))
        out_text = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, dropout_p=dropout_p)
        text = [project(out_text.transpose(1, 2).reshape(batch, T, heads * dim))]
    image = []
    if m > 0:
        n = plan.grid * plan.grid
        if plan.kind == "column":  # every column block holds row 0: all slots
            blocks, real = len(plan.queries), n  # (a prefix's missing codes unused)
        else:  # a raster prefix needs only the blocks it reaches, and its own slots
            blocks, real = -(-m // plan.block), m
        for lo, hi in _chunks(plan, blocks, size, dim, matmul):  # each (slots, B, heads · d)
            if matmul:
                out, out_text = _MatmulBlocks.apply(q, k, v, plan, lo, hi, lo == 0)
                if lo == 0:
                    text = [project(out_text)]
            else:
                out = _fused_blocks(q, k, v, plan, lo, hi, dropout_p)
            image.append(project(out[: real - lo * plan.block]))
        if plan.kind == "column":  # slots run column by column: back to raster order
            columns = torch.cat(image).unflatten(0, (plan.grid, plan.grid))
            # a transposing copy (its backward is one too; a gather's is a scatter-add)
            image = [columns.transpose(0, 1).flatten(0, 1)[:m]]
    pieces = text + [piece.transpose(0, 1) for piece in image]
    return torch.cat(pieces, 1)
