"""Cached decoding: one new stream position through every layer, reading a key/value cache.

Sampling (paper section 2.6) feeds the image codes one at a time, so each code costs one
pass of a single position through the layers. For one position the arithmetic is tiny
(each weight is used once per row of the batch), so the step should cost what it takes to
*read* the weights and the cached keys and values, and nothing else. This module is that
step, as plain tensor functions over the weights the transformer hands it
(:class:`DecodeWeights`):

* **q, k, v in one matrix product.** The three projections are stacked into one
  matrix, built from the layer's own weights (a saved model folder loads unchanged) and
  rebuilt only when the weights change. On a CPU every matrix of the step is kept
  input-major, ``(in, out)`` contiguous: MKL multiplies one row by that layout faster
  than by ``nn.Linear``'s ``(out, in)`` when the matrix has at least as many outputs as
  inputs (49 against 127 µs for 256 -> 1024); a matrix with more inputs than outputs
  (the feed-forward's second) is read in the layer's own ``(out, in)`` layout, which
  MKL reads faster there (70 against 136 µs for 1024 -> 256). Elsewhere the matrices are
  transposed views (cuBLAS reads both layouts alike).
* **Pre-packed matrices for many rows (CPU, float32).** From :data:`PACKED_ROWS` rows on,
  a product of a few rows by a layer matrix is bound by arithmetic, not by reading the
  weights, and MKL re-packs the matrix into its blocked layout at every call. The step
  then multiplies by a copy packed once into oneDNN's blocked layout (the one
  ``torch.compile`` uses on a CPU), with the feed-forward's GELU fused into the product:
  1.6× faster at 8 rows (docs/benchmarks.md). One row keeps the plain product, which is
  faster there.
* **Two rows read the weights once, as one row does.** Two rows are what guidance
  decodes for one image (the caption's row and the empty caption's). MKL multiplies two
  rows by a matrix it streams from memory at about two thirds of the speed of one row,
  unless the product is turned around: ``(W xᵀ)ᵀ`` with ``W`` ``(out, in)``, each weight
  row read once against both rows (64 against 92 µs for 256 -> 1024 with the weights out
  of cache). :class:`Matrix` holds the three forms.
* **A preallocated cache, written in place.** Keys and values of every layer live in
  ``(B, heads, capacity, dim_head)`` buffers; a step writes one position and reads a
  view, never a concatenation.
* **Only the keys a mask allows, read where they lie.** DALL-E's sparse masks (appendix
  B.1, :mod:`dalle1.masks`) let an image query see every text position and a few image
  positions. :func:`key_reads` turns a query's row of the boolean stream mask into a
  *read*: a short list of slices of the cache (the text, then one window — a run of
  consecutive positions for a row mask, positions ``grid`` apart for a column mask) or,
  when the allowed keys scatter into many runs, an index for a gather. Slices are views:
  :func:`attend` gives them one softmax without copying a key. A masked key would add
  exp(-inf) = 0 to the softmax, so skipping it changes nothing but the work.
* **Optionally, a bfloat16 cache** (:func:`cache_dtype`, opt-in). At long streams and
  many rows the cache, not the weights, is most of what a step reads (grid 32, batch 8,
  dense: 35 of 48 MB); bfloat16 keys and values halve it, at bfloat16's precision. Its
  attention runs in bfloat16 only where that kernel is fast (:func:`attention_dtype`).

Two forms of the step, the same function of the inputs (tests hold them equal):

* :func:`decode_layer` — eager, the position a Python int, the reads exact slices. The
  default on a CPU, where it measured as fast as the compiled form (docs/benchmarks.md).
* :func:`static_step` — every shape fixed for the whole generation and the position a
  tensor: keys are gathered through a padded index per mask kind (dense layers read the
  whole capacity under a causal bias). This is the form ``torch.compile`` compiles and a
  CUDA graph captures (:class:`StepRunner`), which removes the per-kernel launch latency
  that dominates decoding on a GPU.

:func:`decode_mode` picks the form (``DALLE1_DECODE`` = ``eager | compile | graph | auto``);
a compile or a capture that fails falls back to the eager step with a warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

MODES = ("auto", "eager", "compile", "graph")
MAX_SLICES = 2  # more runs than this (the conv mask's k rows) read through a gather instead
EPS = 1e-5  # LayerNorm epsilon (torch's and x-transformers' default)

# A read of one query: slices of stream positions (views of the cache), or an index (gather).
Read = tuple[slice, ...] | torch.Tensor


PACKED_ROWS = 3  # from this many rows on, a CPU float32 step multiplies by packed matrices
WEIGHT_MAJOR_ROWS = 2  # this many rows multiply as (W xᵀ)ᵀ, W (out, in) (Matrix.out_major)


# The faster copies cost memory (the packed one about the matrices again): above this many
# bytes of matrices a model decodes without it.
PACK_MAX_BYTES = 2 << 30


def packing_available() -> bool:
    """Whether this torch has oneDNN's packed linear (x86 and ARM CPU builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def reorder(out_in: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of an ``(out, in)`` matrix, or None where oneDNN cannot make it."""
    if not packing_available():
        return None
    try:
        # the batch-size hint picks the blocked layout; 8 rows' serves 3 to hundreds of rows
        return torch.ops.mkldnn._reorder_linear_weight(out_in, 8)
    except RuntimeError:  # a CPU or build without the kernel: the plain products serve
        return None


@dataclass
class Matrix:
    """One matrix of the step, ``x @ weight (+ bias)``, optionally GELU after.

    ``weight`` is input-major ``(in, out)`` (:func:`input_major`). On a CPU in float32,
    ``out_major`` is the ``(out, in)`` form (kept by :meth:`of`, else made by :meth:`pack`),
    for :data:`WEIGHT_MAJOR_ROWS` rows and for one row of a matrix with more inputs than
    outputs; :meth:`pack` adds ``packed`` (the matrix in oneDNN's blocked layout, for
    products of :data:`PACKED_ROWS` rows or more). A compiled step (``torch.compile``)
    uses ``weight`` alone.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    packed: torch.Tensor | None = None
    out_major: torch.Tensor | None = None  # (out, in) contiguous (CPU float32 only)

    @classmethod
    def of(cls, out_in: torch.Tensor, bias: torch.Tensor | None = None) -> Matrix:
        """The matrix of an ``(out, in)`` weight (``nn.Linear``'s layout). On a CPU in
        float32 that weight itself, not a copy, is kept as ``out_major``."""
        out_in = out_in.detach()
        cpu32 = out_in.device.type == "cpu" and out_in.dtype == torch.float32
        return cls(input_major(out_in), bias, out_major=out_in.contiguous() if cpu32 else None)

    def pack(self) -> Matrix:
        """This matrix with the forms a CPU float32 step multiplies faster (else unchanged):
        the packed copy, and the ``(out, in)`` form (a copy unless :meth:`of` kept the
        layer's weight), which two rows multiply turned around (:data:`WEIGHT_MAJOR_ROWS`)
        and one row multiplies about twice as fast as the input-major layout when the
        matrix has more inputs than outputs (the feed-forward's second one: 70 against
        136 µs for 1024 -> 256)."""
        w = self.weight
        if w.device.type != "cpu" or w.dtype != torch.float32:
            return self
        out_in = self.out_major if self.out_major is not None else w.t().contiguous()
        return Matrix(w, self.bias, reorder(out_in), out_in)

    def __call__(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        flat = x.reshape(-1, x.shape[-1])
        rows, (n_in, n_out) = len(flat), self.weight.shape
        eager = not torch.compiler.is_compiling()  # a compiled step packs by itself
        if self.packed is not None and eager and rows >= PACKED_ROWS:
            # oneDNN's fused GELU is the exact (erf) one, as F.gelu
            act, algorithm = ("gelu", "none") if gelu else ("none", "")
            out = torch.ops.mkldnn._linear_pointwise(
                flat, self.packed, self.bias, act, [], algorithm
            )
        else:
            out_major = self.out_major is not None and eager
            if out_major and rows == WEIGHT_MAJOR_ROWS:
                out = self._turned_around(flat)
            elif out_major and n_in > n_out:
                out = F.linear(flat, self.out_major, self.bias)
            else:
                out = project(flat, self.weight, self.bias)
            out = F.gelu(out) if gelu else out
        return out.view(*x.shape[:-1], n_out)

    def _turned_around(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat @ weight (+ bias)`` as ``(W flatᵀ)ᵀ``: each row of ``W`` ``(out, in)`` is
        read once, against all the rows of ``flat`` at once."""
        if self.bias is None:
            out_t = torch.mm(self.out_major, flat.t())
        else:
            out_t = torch.addmm(self.bias[:, None], self.out_major, flat.t())
        return out_t.t().contiguous()

    def nbytes(self) -> int:
        """Bytes of the matrix and its bias (the packed copy is the same numbers again)."""
        parts = [self.weight] if self.bias is None else [self.weight, self.bias]
        return sum(t.numel() * t.element_size() for t in parts)


@dataclass
class LayerWeights:
    """One pre-norm layer as the decode step reads it (x-transformers ``Decoder`` layer)."""

    norm: torch.Tensor  # attention pre-norm gain (a LayerNorm without bias)
    qkv: Matrix  # (dim, 3 · heads · dim_head): to_q, to_k, to_v side by side
    out: Matrix  # (heads · dim_head, dim)
    ff_norm: torch.Tensor  # feed-forward pre-norm gain
    ff_in: Matrix  # (dim, ff_mult · dim), with its bias; GELU follows
    ff_out: Matrix  # (ff_mult · dim, dim), with its bias

    def pack(self) -> LayerWeights:
        """The layer with its matrices packed (:meth:`Matrix.pack`)."""
        q, o, i, f = (m.pack() for m in (self.qkv, self.out, self.ff_in, self.ff_out))
        return LayerWeights(self.norm, q, o, self.ff_norm, i, f)


@dataclass
class DecodeWeights:
    """Everything one decode step reads: the layers, the final norm, the image head.

    Each matrix is a :class:`Matrix` (input-major, with its faster CPU copies after
    :meth:`pack`)."""

    layers: list[LayerWeights]
    norm_weight: torch.Tensor  # final LayerNorm
    norm_bias: torch.Tensor
    head: Matrix  # image logits head (dim, image_vocab), with its bias
    image_emb: torch.Tensor  # (image_vocab, dim)
    row_pos: torch.Tensor  # (grid, dim)
    col_pos: torch.Tensor  # (grid, dim)
    heads: int
    grid: int
    n_text: int  # <bos> + L text positions: stream position of image code 0

    def nbytes(self) -> int:
        """Bytes one step reads from the weights: every layer, the norm and the head, and one
        row of each embedding table per batch row (counted once here)."""
        matrices = [m for w in self.layers for m in (w.qkv, w.out, w.ff_in, w.ff_out)]
        vectors = [t for w in self.layers for t in (w.norm, w.ff_norm)]
        vectors += [self.norm_weight, self.norm_bias, self.image_emb[0], self.row_pos[0]]
        vectors += [self.col_pos[0]]
        return sum(m.nbytes() for m in matrices + [self.head]) + sum(
            t.numel() * t.element_size() for t in vectors
        )

    def pack(self) -> DecodeWeights:
        """The weights with every matrix packed where packing applies (:meth:`Matrix.pack`),
        unless the matrices hold more than :data:`PACK_MAX_BYTES` (then unchanged)."""
        if self.nbytes() > PACK_MAX_BYTES:
            return self
        return replace(self, layers=[w.pack() for w in self.layers], head=self.head.pack())

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    @property
    def dim_head(self) -> int:
        """Width of one head's keys and values (the stacked q, k, v hold 3 · heads of them)."""
        return self.layers[0].qkv.weight.shape[1] // (3 * self.heads)


def input_major(weight: torch.Tensor) -> torch.Tensor:
    """An ``nn.Linear`` weight ``(out, in)`` as the step multiplies it: ``(in, out)``,
    contiguous on a CPU (see the module docstring), a transposed view elsewhere."""
    t = weight.detach().t()
    return t.contiguous() if t.device.type == "cpu" else t


def project(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight (+ bias)`` for an input-major weight; x (..., in) -> (..., out)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.mm(flat, weight) if bias is None else torch.addmm(bias, flat, weight)
    return out.view(*x.shape[:-1], weight.shape[1])


def weights_fingerprint(tensors: Sequence[torch.Tensor]) -> tuple:
    """Changes whenever one of the tensors is replaced or updated in place (an optimizer
    step bumps ``_version``), so derived weights (the stacked q, k, v) are rebuilt then."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in tensors)


# --- which keys a query reads -----------------------------------------------------------


def runs(positions: Sequence[int]) -> list[slice]:
    """Sorted key positions -> the fewest greedy arithmetic runs ``slice(start, stop, step)``.

    ``[0 1 2 3 7 8 9]`` -> ``[0:4, 7:10]``; ``[0 1 2 5 9 13]`` -> ``[0:3, 5:14:4]``.
    """
    out: list[slice] = []
    i, n = 0, len(positions)
    while i < n:
        start = positions[i]
        if i + 1 == n:
            out.append(slice(start, start + 1, 1))
            break
        step = positions[i + 1] - start
        j = i + 1
        while j + 1 < n and positions[j + 1] - positions[j] == step:
            j += 1
        out.append(slice(start, positions[j] + 1, step))
        i = j + 1
    return out


def key_reads(mask: torch.Tensor, max_slices: int = MAX_SLICES) -> list[Read]:
    """Per query position of a boolean stream mask ``(S, S)``: how the step reads its keys.

    At most ``max_slices`` runs (dense: one; row and column masks: the text and one window)
    are read as views of the cache; more than that (the conv mask's rows) through an index.
    """
    reads: list[Read] = []
    for row in mask.cpu():
        positions = row.nonzero().flatten().tolist()
        found = runs(positions)
        reads.append(tuple(found) if len(found) <= max_slices else torch.tensor(positions))
    return reads


@dataclass
class StaticReads:
    """A sparse kind's reads with fixed shapes, for :func:`static_step`: per query
    position the allowed keys padded to the widest row, and a bias masking the padding."""

    index: torch.Tensor  # (S, W) long: allowed key positions, then repeats of the last
    bias: torch.Tensor  # (S, W) float: 0 for an allowed key, -inf for padding

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> StaticReads:
        counts = mask.sum(1)
        width = int(counts.max())
        # stable sort puts the allowed positions first, in ascending order
        order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :width]
        valid = torch.arange(width)[None, :] < counts[:, None]
        last = order.gather(1, (counts - 1).clamp(min=0)[:, None])
        index = torch.where(valid, order, last)
        bias = torch.zeros(index.shape).masked_fill(~valid, float("-inf"))
        return cls(index, bias)

    def to(self, device: torch.device, dtype: torch.dtype) -> StaticReads:
        return StaticReads(self.index.to(device), self.bias.to(device, dtype))


# --- the eager step ---------------------------------------------------------------------


def cut(t: torch.Tensor, s: slice) -> torch.Tensor:
    """Positions ``s`` of a cache buffer (B, H, capacity, d): a view (``narrow`` for a unit
    step: the same view as ``t[:, :, s]`` at a fraction of Python's indexing cost)."""
    if s.step == 1:
        return t.narrow(2, s.start, s.stop - s.start)
    return t[:, :, s]


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, read: Read) -> torch.Tensor:
    """softmax(q kᵀ / √d) v for one query position (B, H, 1, d) over the keys ``read`` names.

    One slice: ``scaled_dot_product_attention`` on a view. Several: one softmax over the
    concatenated *scores* of the slices (a few numbers per head), then the weighted values
    of each slice summed, so no key or value is copied. An index: a gather, then attention.
    A cache in another dtype than ``q`` (:func:`cache_dtype`) is attended in
    :func:`attention_dtype` (one slice) or ``q``'s dtype (the others); the answer is in
    ``q``'s dtype.
    """
    if isinstance(read, torch.Tensor):
        k, v = keys.index_select(2, read), values.index_select(2, read)
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))
    if len(read) == 1:  # a long read (dense): in attention_dtype
        k, v = cut(keys, read[0]), cut(values, read[0])
        if keys.dtype == q.dtype:  # the default: no conversion to look up
            return F.scaled_dot_product_attention(q, k, v)
        work = attention_dtype(keys, q.dtype)
        out = F.scaled_dot_product_attention(q.to(work), k.to(work), v.to(work))
        return out.to(q.dtype)
    # a few short windows (row, column layers): their products of one query ran faster in
    # float32 than in bfloat16 (grid 32, batch 8, `dalle` masks: 4.7 against 5.5 s)
    parts = [(cut(keys, s).to(q.dtype), cut(values, s).to(q.dtype)) for s in read]
    scores = torch.cat([q @ k.transpose(-1, -2) for k, _ in parts], dim=-1)
    probs = (scores.float() * q.shape[-1] ** -0.5).softmax(-1).to(q.dtype)
    out, at = None, 0
    for _, v in parts:
        n = v.shape[2]
        term = probs[..., at : at + n] @ v
        out, at = (term if out is None else out.add_(term)), at + n
    return out


def read_width(read: Read) -> int:
    """How many cached positions a :data:`Read` names."""
    if isinstance(read, torch.Tensor):
        return len(read)
    return sum(len(range(s.start, s.stop, s.step)) for s in read)


def decode_layer(
    x: torch.Tensor,
    w: LayerWeights,
    heads: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    start: int,
    read: Read | torch.Tensor | None,
    parallel_from: int | None = None,
) -> torch.Tensor:
    """One pre-norm layer for new positions [start, start + n), writing their keys/values.

    The same arithmetic as the x-transformers layer: LayerNorm -> q, k, v ->
    softmax(q kᵀ / √d) v -> out projection, residual; LayerNorm -> GELU feed-forward,
    residual. ``read``: for one position (n = 1) its :data:`Read`; for several, a boolean
    ``(n, start + n)`` mask, or None for plain causal attention from position 0.
    ``parallel_from``: the bytes from which one position's read runs on every thread
    (:func:`read_threads`).
    """
    b, n, d = x.shape
    h = F.layer_norm(x, (d,), w.norm, eps=EPS)
    q, k, v = w.qkv(h).view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    stop = start + n
    keys.narrow(2, start, n).copy_(k)
    values.narrow(2, start, n).copy_(v)
    if n == 1:
        with intra_op_threads(read_threads(keys, read, parallel_from)):
            out = attend(q, keys, values, read)
    else:
        past_k, past_v = keys.narrow(2, 0, stop), values.narrow(2, 0, stop)
        causal = read is None and start == 0
        work = attention_dtype(keys, x.dtype)
        out = F.scaled_dot_product_attention(
            q.to(work), past_k.to(work), past_v.to(work), attn_mask=read, is_causal=causal
        ).to(x.dtype)
    x = x + w.out(out.transpose(1, 2).reshape(b, n, -1))
    h = F.layer_norm(x, (d,), w.ff_norm, eps=EPS)
    return x + w.ff_out(w.ff_in(h, gelu=True))


# --- the static step (compiled / captured) ----------------------------------------------


def static_step(
    w: DecodeWeights,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    reads: list[StaticReads | None],
    code: torch.Tensor,
    index: torch.Tensor,
) -> torch.Tensor:
    """Feed code number ``index`` (a (1,) long tensor) for every row -> image logits (B, Vi).

    Fixed shapes throughout, so one compiled graph (or one CUDA graph) serves every step:
    the new key/value is written with ``index_copy_``; a dense layer (``reads[i]`` None)
    attends the whole capacity under a causal bias; a sparse layer gathers its padded
    allowed keys (:class:`StaticReads`). Unwritten cache positions are zeros and masked.
    """
    pos = index + w.n_text  # stream position of the code
    x = F.embedding(code, w.image_emb) + F.embedding(index // w.grid, w.row_pos)
    x = x + F.embedding(index % w.grid, w.col_pos)  # same order of sums as DALLE.embed_codes
    b, d = x.shape
    capacity = keys[0].shape[2]
    causal = torch.zeros(1, capacity, device=x.device, dtype=keys[0].dtype).masked_fill(
        torch.arange(capacity, device=x.device) > pos, float("-inf")
    )  # (1 query, capacity keys)
    for lw, k_cache, v_cache, read in zip(w.layers, keys, values, reads):
        h = F.layer_norm(x, (d,), lw.norm, eps=EPS)
        q, k, v = lw.qkv(h).view(b, 3, w.heads, 1, -1).unbind(1)
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)  # no-ops unless cache_dtype differs
        k_cache.index_copy_(2, pos, k)
        v_cache.index_copy_(2, pos, v)
        work = attention_dtype(k_cache, x.dtype)
        if read is None:
            k_all, v_all, bias = k_cache, v_cache, causal
        else:
            allowed = read.index[pos].squeeze(0)  # (W,)
            k_all, v_all = k_cache.index_select(2, allowed), v_cache.index_select(2, allowed)
            bias = read.bias[pos]  # (1 query, W keys)
        out = F.scaled_dot_product_attention(
            q.to(work), k_all.to(work), v_all.to(work), attn_mask=bias.to(work)
        )
        x = x + lw.out(out.to(x.dtype).reshape(b, -1))
        h = F.layer_norm(x, (d,), lw.ff_norm, eps=EPS)
        x = x + lw.ff_out(lw.ff_in(h, gelu=True))
    return logits(w, x)


def logits(w: DecodeWeights, x: torch.Tensor) -> torch.Tensor:
    """Final LayerNorm and the image head: hidden states (..., dim) -> (..., image_vocab)."""
    h = F.layer_norm(x, x.shape[-1:], w.norm_weight, w.norm_bias, eps=EPS)
    return w.head(h)


SERIAL_ROWS = 32  # a CPU step over fewer rows than this runs on one thread (decode_threads)
SPINNING_SERIAL_ROWS = 4  # the same, where OpenMP's idle threads spin long (openmp_spins_long)
LONG_SPIN = 10_000  # a GOMP_SPINCOUNT from this on keeps a thread awake between two products


def openmp_spins_long(env: Mapping[str, str] | None = None) -> bool:
    """Whether idle OpenMP threads busy-wait long between parallel regions.

    GNU OpenMP's rule: a readable ``GOMP_SPINCOUNT`` sets the spin (long from
    :data:`LONG_SPIN` on, or ``infinity``); else ``OMP_WAIT_POLICY=ACTIVE`` spins for
    minutes and ``PASSIVE`` not at all; with neither set (a process that imported torch
    before dalle1) it spins 300,000 times, a few milliseconds. The runtime reads these
    once, when torch loads it; the environment is read here as the record of that.
    """
    env = os.environ if env is None else env
    count = env.get("GOMP_SPINCOUNT", "").strip().lower()
    if count in ("infinite", "infinity"):
        return True
    try:
        return int(count) >= LONG_SPIN
    except ValueError:  # unset or unreadable: libgomp goes by the policy
        return env.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE"


def decode_threads(rows: int, device: torch.device, env: Mapping[str, str] | None = None) -> int:
    """Intra-op threads for the cached steps of ``rows`` batch rows.

    A step is a few hundred small operations (a matrix product of 1-16 rows by a
    256-wide layer costs tens to a hundred microseconds). Whether a second thread pays
    for that size depends on what the thread does between two of them:

    * it sleeps soon (``OMP_WAIT_POLICY=PASSIVE``, or a short spin such as
      ``GOMP_SPINCOUNT=1000``): waking it costs about what it saves. Fewer
      than :data:`SERIAL_ROWS` rows run on one thread: on the shared 2-core machine the
      second thread doubled the process CPU time for no shorter wall time, and under load
      lengthened it (batch 8: 435 vs 315 tokens/s, docs/benchmarks.md);
    * it spins long (:func:`openmp_spins_long`; the 10,000 spins dalle1 sets before torch
      loads, or libgomp's own default): it is awake for the next product and burns its
      core either way, so from :data:`SPINNING_SERIAL_ROWS` rows on the step uses every
      thread (batch 8: a generation 1.2 -> 0.9 s at grid 16, 7.3 -> 5.9 s at grid 32;
      batch 1 and 2 no faster, so they stay on one).

    Elsewhere (CUDA) torch's setting.
    """
    serial = SPINNING_SERIAL_ROWS if openmp_spins_long(env) else SERIAL_ROWS
    if device.type != "cpu" or rows >= serial:
        return torch.get_num_threads()
    return 1


# A one-query read of at least this many key + value bytes, over at least this many
# (batch row, head) pairs, runs on every thread torch was given, even inside a
# one-thread step: streaming several MB is faster on two cores than on one, while at
# this size the products around it are still too small to split. Below it, waking the
# second thread can cost more than it saves. The threshold depends on where the reads
# come from (:func:`parallel_read_bytes`):
#
# * from the last-level cache, when everything a step reads (weights and the whole
#   key/value cache) fits in it: one core reads fast there, and the threshold is 6 MB.
#   On a 2-core machine with a large L3 a 1 MB read took 108 µs on two threads against
#   43 on one, and a generation at grid 16, batch 8, 1.35-1.48 s with 1 MB against
#   1.15-1.33 s with 6 MB;
# * from memory, when it does not: one core streams a read at half the machine's
#   bandwidth, and the threshold is 2 MB. On a 2-core Zen 4 (32 MB L3) generations ran
#   4-9% faster with 2 MB than with 6 MB (grid 16 batch 8, grid 32 batches 2, 4 and 8).
#
# The kernel splits the read by (row, head): one row's 8 heads gave each thread too
# little (batch 1 at grid 16 slower; docs/benchmarks.md).
PARALLEL_READ_BYTES = 6 << 20
STREAMED_READ_BYTES = 2 << 20
PARALLEL_READ_HEADS = 16

_outer_threads: list[int] = []  # the counts intra_op_threads blocks replaced, outermost first


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, then restore the previous count."""
    before = torch.get_num_threads()
    _outer_threads.append(before)
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        _outer_threads.pop()
        if n != before:
            torch.set_num_threads(before)


CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")  # Linux: index0 (L1) ... index3 (L3)
SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}  # sysfs writes sizes as "32768K"


@lru_cache(maxsize=4)
def last_level_cache_bytes(caches: Path = CPU_CACHES) -> int:
    """The size of this CPU's largest cache (Linux sysfs ``caches``), or 0 where it cannot
    be read."""
    sizes = [0]
    for index in caches.glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        if text[:-1].isdigit() and text[-1] in SIZE_UNITS:
            sizes.append(int(text[:-1]) * SIZE_UNITS[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes)


def parallel_read_bytes(working_set: int, cache_bytes: int | None = None) -> int:
    """From how many bytes a one-query read runs on every thread, for a step that reads
    ``working_set`` bytes in all (weights and the whole key/value cache):
    :data:`STREAMED_READ_BYTES` when that is more than the last-level cache
    (``cache_bytes``, default :func:`last_level_cache_bytes`), so the reads stream from
    memory, else :data:`PARALLEL_READ_BYTES` (also where the cache size is unknown)."""
    llc = last_level_cache_bytes() if cache_bytes is None else cache_bytes
    return STREAMED_READ_BYTES if 0 < llc < working_set else PARALLEL_READ_BYTES


def read_threads(keys: torch.Tensor, read: Read, threshold: int | None = None) -> int:
    """Threads for one query's attention over the positions ``read`` names in ``keys``
    (B, H, capacity, d): torch's own setting (outside any :func:`intra_op_threads`) for
    a read of ``threshold`` bytes or more of keys and values (default
    :data:`PARALLEL_READ_BYTES`; :func:`parallel_read_bytes`) over
    :data:`PARALLEL_READ_HEADS` or more (row, head) pairs on a CPU, else the current
    count."""
    threshold = PARALLEL_READ_BYTES if threshold is None else threshold
    current = torch.get_num_threads()
    b, h, capacity, d = keys.shape
    per_position = 2 * b * h * d * keys.element_size()  # one key and one value
    if keys.device.type != "cpu" or b * h < PARALLEL_READ_HEADS:
        return current
    # the whole cache is below the threshold at most steps of small batches: no counting
    if per_position * capacity < threshold:
        return current
    if per_position * read_width(read) < threshold:
        return current
    return _outer_threads[0] if _outer_threads else current


CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dtype(requested: str | torch.dtype | None, weights: torch.dtype) -> torch.dtype:
    """The dtype of the key/value cache: ``requested``, else ``$DALLE1_CACHE_DTYPE``, else
    the weights' own (so a float32 model decodes exactly as its full forward computes).

    ``bfloat16`` under float32 weights halves the bytes a step reads from the cache, which
    is what a step costs at long streams and many rows (grid 32, batch 8: the attention
    reads about 70% of the bytes); the keys and values then carry bfloat16's 8 bits of
    mantissa, so the logits move (by about 1e-3 in the tests' small models) and a sample
    equal to the float32 model's is no longer promised. Opt-in, never the default.
    """
    if isinstance(requested, torch.dtype):
        return requested
    name = requested or os.environ.get("DALLE1_CACHE_DTYPE", "")
    if not name:
        return weights
    if name not in CACHE_DTYPES:
        where = "" if requested else " ($DALLE1_CACHE_DTYPE)"
        raise ValueError(
            f"cache dtype{where} must be one of {', '.join(CACHE_DTYPES)}, got '{name}'"
        )
    return CACHE_DTYPES[name]


@lru_cache(maxsize=1)
def _cpu_has_amx() -> bool:
    return torch.cpu._is_amx_tile_supported()


def attention_dtype(keys: torch.Tensor, compute: torch.dtype) -> torch.dtype:
    """The dtype attention over the cached ``keys`` runs in: the cache's own where the
    kernels are fast in it (a GPU; a CPU with AMX tiles), else ``compute`` (the weights'
    dtype), the keys and values converted as they are read.

    ``scaled_dot_product_attention`` in bfloat16 on a CPU without AMX (AVX-512 bf16 alone,
    as on AMD Zen 4) took twice its float32 time: there a bfloat16 cache made grid 32,
    batch 8 slower than a float32 one (18.7 against 9.6 s). Converted as read, the same
    cache decoded in 12 s against float32's 10 (grid 16: the same time), in half the
    memory (docs/benchmarks.md). With AMX the bfloat16 kernel is the faster one.
    """
    if keys.dtype == compute or keys.device.type != "cpu" or _cpu_has_amx():
        return keys.dtype
    return compute


def decode_mode(requested: str | None, device: torch.device) -> str:
    """The step form to use: ``requested``, else ``$DALLE1_DECODE``, else ``auto``.

    ``auto`` is ``eager`` on a CPU (compiling took 23 s with a warm inductor cache and
    140 s cold on 2 busy cores, for no faster step: docs/benchmarks.md) and ``graph`` on
    CUDA (a captured CUDA graph replays the whole step as one launch; capturing costs about
    one step). ``graph`` needs CUDA; elsewhere it means ``compile``.
    """
    mode = requested or os.environ.get("DALLE1_DECODE", "") or "auto"
    if mode not in MODES:
        raise ValueError(f"decode mode must be one of {', '.join(MODES)}, got '{mode}'")
    if mode == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if mode == "graph" and device.type != "cuda":
        return "compile"
    return mode


class StepRunner:
    """Runs :func:`static_step` compiled (``torch.compile``) or as a captured CUDA graph.

    One runner serves one cache (a graph's inputs are that cache's buffers). The first call
    compiles / captures; if that raises, the runner warns, marks itself failed, and returns
    None from then on, so the caller decodes that cache eagerly.
    """

    def __init__(self, mode: str, compiled: Callable | None = None):
        self.mode, self.failed = mode, False
        self.compiled = compiled  # the model's torch.compile(static_step), shared by its caches
        self.graph = None
        self.static: dict[str, torch.Tensor] = {}

    def fresh(self) -> StepRunner:
        """A runner of the same form for another cache (a clone): nothing captured yet."""
        runner = StepRunner(self.mode, self.compiled)
        runner.failed = self.failed
        return runner

    def fail(self, error: BaseException) -> None:
        self.failed = True
        what = "torch.compile" if self.mode == "compile" else "CUDA graph capture"
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        warnings.warn(
            f"dalle1: {what} failed ({type(error).__name__}: {first}); decoding eagerly "
            "instead (DALLE1_DECODE=eager skips the attempt)",
            RuntimeWarning,
            stacklevel=3,
        )

    def __call__(self, w, keys, values, reads, code, index) -> torch.Tensor | None:
        if self.failed:
            return None
        try:
            if self.mode == "compile":
                return self.compiled(w, keys, values, reads, code, index)
            return self._replay(w, keys, values, reads, code, index)
        except Exception as error:  # compile or capture unavailable here: eager from now on
            self.fail(error)
            return None

    def _replay(self, w, keys, values, reads, code, index) -> torch.Tensor:
        """CUDA graph: static input buffers, captured on the first call, replayed after."""
        if self.graph is None:
            self.static = {"code": code.clone(), "index": index.clone()}
            args = (w, keys, values, reads, self.static["code"], self.static["index"])
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up; it writes this position's k, v as replay will
                static_step(*args)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.static["logits"] = static_step(*args)
            self.graph = graph
        self.static["code"].copy_(code)
        self.static["index"].copy_(index)
        self.graph.replay()
        return self.static["logits"].clone()
