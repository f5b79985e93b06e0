"""The transformer: one decoder-only stream of text tokens, then image tokens.

DALL-E 1 (paper section 2.2, "Stage Two") concatenates up to 256 caption
tokens and the 32x32 = 1024 image codes into a single stream and models it
autoregressively. The stream the model *reads* is

    [<bos>, t_1 … t_L, c_1 … c_{N-1}]          (length L + N)

and position ``i`` predicts stream token ``i + 1``. So positions ``0 … L-1``
predict text and positions ``L … L+N-1`` predict image codes. Each half gets
its own output head (the "logit split"): text positions can only ever
produce text tokens and image positions only image codes. The loss weights
them 1/8 : 7/8 (paper section 2.2).

Positional information: text positions get a learned embedding per slot; image
positions get a learned *row* embedding plus a learned *column* embedding, so
the model knows where on the grid a code sits even though the stream is 1-D
(the same factorisation as DALL-E's released code and DALLE-pytorch's axial
embedding). These are absolute, added once at the input, which keeps the
key/value cache trivially exact: a cached key never depends on how many tokens
come after it.

Each layer holds the parameters of an x-transformers ``Decoder`` of depth one
(pre-norm attention + feed-forward), and every layer has its own attention kind
(dense, or DALL-E's row / column / conv masks, see :mod:`dalle1.masks`). The
layer arithmetic is written out here, twice: :meth:`DALLE._layer` for training
and full recompute, where a sparse layer runs :func:`dalle1.attention.sparse_attention`
(blocks of queries against the keys their mask allows, never an (S, S) mask),
and :mod:`dalle1.decoding` for decoding with the key/value cache (``prefill`` /
``step``: q, k, v stacked into one product, preallocated key/value buffers, under a
sparse mask only the keys the mask allows, read in place). The tests hold both to
x-transformers' own forward with the whole mask as a bias (≤ 1e-5 and ≤ 1e-4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from x_transformers import Decoder
from x_transformers.x_transformers import LayerNorm as XLayerNorm

from . import decoding
from .attention import BlockPlan, block_plan, matmul_attention, sparse_attention
from .config import DALLEConfig
from .decoding import (
    DecodeWeights,
    LayerWeights,
    Matrix,
    Read,
    StaticReads,
    StepRunner,
    decode_layer,
    decode_mode,
    key_reads,
    static_step,
    weights_fingerprint,
)
from .masks import KINDS, key_table, layer_kinds, mask_to_bias, stream_mask, stream_rows


@dataclass
class StreamShape:
    """The numbers that tie the transformer to its tokenizers."""

    text_vocab: int  # BPE tokens + one pad per text position
    text_len: int  # L
    image_vocab: int  # codebook size of the VAE
    grid: int  # the image is grid x grid codes; N = grid²
    bos_id: int  # id of <bos> in the text vocabulary

    @property
    def num_codes(self) -> int:
        return self.grid * self.grid


def _layer_parts(layer: Decoder) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """The four parts of a depth-one x-transformers ``Decoder``: (attention norm, attention,
    feed-forward norm, feed-forward). ``layer.layers`` holds, per sub-layer (attention
    first), [its norms (the pre-norm first), the block, the residual] (x-transformers 2.x)."""
    attn_block, ff_block = layer.layers
    return attn_block[0][0], attn_block[1], ff_block[0][0], ff_block[1]


# (q, k, v) each (B, S, heads, d) and the output projection -> the projected attention
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, nn.Module], torch.Tensor]


def _gain(norm: nn.Module) -> torch.Tensor:
    """The gain an x-transformers ``LayerNorm`` multiplies by: gamma, plus 1 with
    ``unit_offset`` (its Decoder's default: gamma is stored as the offset from 1)."""
    return norm.gamma + float(norm.unit_offset)


def _matrix(linear: nn.Linear) -> Matrix:
    """An ``nn.Linear`` as the decode step multiplies it (:class:`dalle1.decoding.Matrix`)."""
    bias = None if linear.bias is None else linear.bias.detach()
    return Matrix.of(linear.weight, bias)


def dense_attention(dropout_p: float = 0.0, flash: bool = True) -> Attend:
    """Plain causal attention over the whole stream (``attention: dense``).

    ``flash``: torch's fused ``scaled_dot_product_attention``; False: the same function as
    two matrix products and a float32 softmax (:func:`dalle1.attention.matmul_attention`;
    faster to train under bf16 autocast on a CPU for short streams, whose fused kernel has
    a slow bf16 backward: docs/benchmarks.md)."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, project: nn.Module):
        b, n, heads, d = q.shape
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, S, d)
        if flash:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            out = matmul_attention(q, k, v, causal, dropout_p)
        return project(out.transpose(1, 2).reshape(b, n, heads * d))

    return attend


# Longest stream whose dense layers take the plain products when ``flash`` is off (bf16
# training on a CPU): there they beat the fused kernel's slow bf16 backward, 5.7 vs 15 ms
# per layer at 81 positions; at 545 positions they take 107 ms against its 38.
PLAIN_DENSE_MAX = 256


class Layer(Decoder):
    """One transformer layer: an x-transformers ``Decoder`` of depth one — its parameters,
    their names (those of saved model folders) and its own forward — with dalle1's
    forward beside it, whose attention the caller chooses.

    ``layer(x, attend=f)``: pre-norm attention and feed-forward, each with its residual
    (LayerNorm -> q, k, v -> ``f(q, k, v, to_out)``; LayerNorm -> feed-forward), the same
    arithmetic as x-transformers'. ``layer(x, **kwargs)`` without ``attend`` is
    x-transformers' own forward (the tests' reference). Called as a module either way,
    so FSDP's and activation checkpointing's hooks on the layer see every call.
    """

    def forward(self, x: torch.Tensor, attend: Attend | None = None, **kwargs) -> torch.Tensor:
        if attend is None:
            return super().forward(x, **kwargs)
        norm, attn, ff_norm, ff = _layer_parts(self)
        b, n, _ = x.shape
        h = _autocast_input(_layer_norm(norm, x))
        q, k, v = (proj(h).view(b, n, attn.heads, -1) for proj in (attn.to_q, attn.to_k, attn.to_v))
        x = x + attend(q, k, v, attn.to_out)
        return x + ff(_layer_norm(ff_norm, x))


def _layer_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x-transformers' ``LayerNorm`` (a LayerNorm without affine, then ``* gain``) as one
    ``F.layer_norm`` with the gain as its weight: the same function, in one kernel, whose
    backward pass keeps ``x`` and two numbers per row. The separate product kept a float32
    copy of the normed ``x`` per norm (two per layer: 50 MB of a 6-layer step at 32×32, batch 4)."""
    return F.layer_norm(x, x.shape[-1:], _gain(norm), None, norm.ln.eps)


def _autocast_input(h: torch.Tensor) -> torch.Tensor:
    """``h`` in the dtype autocast runs matrix products in, when it is on: q, k and v then
    read one cast of ``h`` instead of casting it once each, which the backward pass would
    keep three times (bf16, 32×32, batch 4: 25 MB less at a training step's peak)."""
    device = h.device.type
    if not torch.is_autocast_enabled(device):
        return h
    return h.to(torch.get_autocast_dtype(device))


# float32 bytes of logits one piece of the loss converts at a time: on a CPU a piece
# that stays in a core's cache; on a GPU large enough to be few launches
LOSS_PIECE_BYTES = {"cpu": 1 << 20}
LOSS_PIECE_BYTES_ELSEWHERE = 256 << 20


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy in float32, one piece of rows at a time (see :func:`cross_entropy`)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, rows: int) -> torch.Tensor:
        lse = torch.empty(len(logits), device=logits.device, dtype=torch.float32)
        for lo in range(0, len(logits), rows):
            lse[lo : lo + rows] = logits[lo : lo + rows].float().logsumexp(-1)
        picked = logits.gather(1, target[:, None])[:, 0].float()
        ctx.save_for_backward(logits, target, lse)
        ctx.rows = rows
        return (lse - picked).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, target, lse = ctx.saved_tensors
        out, scale, rows = torch.empty_like(logits), grad.float() / len(logits), ctx.rows
        for lo in range(0, len(logits), rows):
            hi = min(lo + rows, len(logits))
            # d/dlogit of lse - logit[target]: softmax - one-hot
            p = (logits[lo:hi].float() - lse[lo:hi, None]).exp_()  # a new tensor: never in place
            p.scatter_add_(1, target[lo:hi, None], p.new_full((hi - lo, 1), -1.0))
            out[lo:hi] = p.mul_(scale)
        return out, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(logits.float(), target)`` (mean over rows) without a float32
    copy of all the logits.

    The logits (N, V) are the largest tensors of a training step (grid 32, batch 4: 4096
    rows of 1,024 codes), and bf16 autocast makes them bf16. ``F.cross_entropy`` on
    their float32 copy keeps float32 log-probabilities for its backward pass and builds
    two float32 gradients of the same size at the step's peak. Here each piece of rows is
    converted, reduced to its log-sum-exp and dropped; the backward pass rebuilds the
    softmax of one piece at a time and writes the gradient in the logits' own dtype. The
    same function, in float32 throughout (tests: ≤ 1e-6 of ``F.cross_entropy``).
    """
    budget = LOSS_PIECE_BYTES.get(logits.device.type, LOSS_PIECE_BYTES_ELSEWHERE)
    rows = max(1, budget // (4 * logits.shape[-1]))
    return _CrossEntropy.apply(logits, target, rows)


def init_weights(module: nn.Module) -> None:
    """The constructors' own initialisation, again, of ``module`` and everything in it.

    For a model materialised with ``to_empty`` (built on the meta device): torch layers'
    ``reset_parameters`` (and :meth:`DALLE.reset_parameters`, the mask tables), and
    x-transformers' LayerNorm gain, which has no such method. Module by module in
    registration order, which is the order the constructors drew their random numbers:
    with the same seed, a materialised model equals one built directly.
    """
    for m in module.modules():
        if isinstance(m, XLayerNorm):
            nn.init.constant_(m.gamma, 1.0 - float(m.unit_offset))
        elif callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()


@dataclass
class Cache:
    """Key/value cache for decoding: per layer, preallocated ``(B, heads, capacity, dim_head)``.

    :meth:`DALLE.prefill` creates it, :meth:`DALLE.step` writes one position into it in place
    and returns it with ``length`` (the stream positions covered) advanced. Because the
    buffers are written in place, a cache is a single line of history: ``clone()`` it to
    branch two continuations from one prefix. A cache decodes with the weights as they were
    at ``prefill`` (``weights``), in the step form ``prefill`` chose (``runner``: None for
    the eager step, else the compiled / CUDA-graph step of :mod:`dalle1.decoding`), with
    buffers of ``dtype`` (None: the weights'; :func:`dalle1.decoding.cache_dtype`).
    ``parallel_from``: the bytes from which one position's read of the cache runs on every
    CPU thread (None: :data:`dalle1.decoding.PARALLEL_READ_BYTES`; ``prefill`` sets it from
    what a step reads, :func:`dalle1.decoding.parallel_read_bytes`).
    """

    keys: list  # per layer: Tensor (B, heads, capacity, dim_head), allocated on first write
    values: list
    length: int
    capacity: int
    weights: DecodeWeights | None = None
    runner: StepRunner | None = None
    dtype: torch.dtype | None = None
    parallel_from: int | None = None

    def clone(self) -> Cache:
        def copy(buffers: list) -> list:
            return [None if t is None else t.clone() for t in buffers]

        runner = None if self.runner is None else self.runner.fresh()
        return replace(self, keys=copy(self.keys), values=copy(self.values), runner=runner)


class DALLE(nn.Module):
    """The decoder-only transformer over ``[<bos>, text | image codes]`` (paper section 2.2).

    ``forward(text, codes)`` gives the text logits and the image logits of the two heads,
    ``loss`` DALL-E's 1/8 : 7/8 cross-entropy, ``prefill`` / ``step`` decode with a
    key/value cache, and ``code_log_likelihood`` scores codes in one pass. Each of the
    ``cfg.depth`` layers has its own attention mask kind (:mod:`dalle1.masks`).
    """

    def __init__(self, cfg: DALLEConfig, shape: StreamShape, kinds: Sequence[str] | None = None):
        """``kinds`` overrides the per-layer mask kinds that ``cfg.attention`` implies
        (one of ``dense | row | column | conv`` per layer; tests and experiments)."""
        super().__init__()
        self.cfg, self.shape = cfg, shape
        dim = cfg.dim
        self.text_emb = nn.Embedding(shape.text_vocab, dim)
        self.image_emb = nn.Embedding(shape.image_vocab, dim)
        self.text_pos = nn.Embedding(shape.text_len + 1, dim)  # <bos> + L slots
        self.row_pos = nn.Embedding(shape.grid, dim)
        self.col_pos = nn.Embedding(shape.grid, dim)
        # These Decoders hold each layer's parameters (their names are the model folder's);
        # _layer (full forward) and dalle1/decoding.py (cached decoding) run their
        # arithmetic, so a new Decoder option must be mirrored there (tests/test_transformer.py
        # holds both to x-transformers' own forward).
        self.layers = nn.ModuleList(
            Layer(
                dim=dim,
                depth=1,
                heads=cfg.heads,
                attn_dim_head=cfg.dim_head,  # attention width = heads x dim_head, not dim
                ff_mult=cfg.ff_mult,
                attn_dropout=cfg.dropout,
                ff_dropout=cfg.dropout,
                attn_flash=True,  # torch's scaled_dot_product_attention
                pre_norm_has_final_norm=False,  # one final norm below, after all layers
            )
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.to_text_logits = nn.Linear(dim, shape.text_vocab)
        self.to_image_logits = nn.Linear(dim, shape.image_vocab)
        self.kinds = list(kinds) if kinds is not None else layer_kinds(cfg.depth, cfg.attention)
        if len(self.kinds) != cfg.depth or not set(self.kinds) <= set(KINDS):
            raise ValueError(f"kinds must name one of {KINDS} per layer ({cfg.depth}): {kinds}")
        # Mask-derived tables (block plans, decode key lists) are built on first use, on
        # the device of the input, and kept here: none is a buffer, so construction on
        # the meta device touches no mask, and the state dict holds parameters only.
        self._tables: dict[tuple, object] = {}
        # training layers: torch's fused attention kernel (False: matrix products, for bf16
        # on a CPU; see dense_attention, PLAIN_DENSE_MAX and dalle1.attention)
        self.flash = True
        # the key/value cache's dtype when prefill is not told (None: $DALLE1_CACHE_DTYPE,
        # else the weights'; dalle1.decoding.cache_dtype). The pipeline sets it.
        self.cache_dtype: str | torch.dtype | None = None
        # decoding's derived state, built on first use (plain attributes: never saved)
        self._reads: dict[tuple, list[Read]] = {}  # (kind, device) -> per stream position
        self._static_reads: dict[tuple, StaticReads] = {}  # (kind, device, dtype) -> padded
        self._decode_weights: tuple[tuple, DecodeWeights] | None = None  # (fingerprint, weights)
        self._compiled_step = None  # torch.compile(static_step), shared by this model's caches

    def reset_parameters(self) -> None:
        """The model's own state that is not a parameter: the mask-derived tables, which
        are dropped here and rebuilt on first use (so nothing needs restoring after
        ``to_empty``). Parameters are left to the sub-modules (:func:`init_weights`)."""
        self._tables = {}
        self._reads, self._static_reads, self._decode_weights = {}, {}, None

    # --- the stream -------------------------------------------------------------------

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """text (B, L) -> embeddings of [<bos>, t_1 … t_L]: (B, L + 1, dim)."""
        bos = torch.full_like(text[:, :1], self.shape.bos_id)
        tokens = torch.cat([bos, text], dim=1)
        return self.text_emb(tokens) + self.text_pos(
            torch.arange(tokens.shape[1], device=text.device)
        )

    def embed_codes(self, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """codes (B, n) at grid indices start … start+n-1 -> (B, n, dim), with row + column positions."""
        index = torch.arange(start, start + codes.shape[1], device=codes.device)
        grid = self.shape.grid
        return self.image_emb(codes) + self.row_pos(index // grid) + self.col_pos(index % grid)

    # --- the masks, as the layers use them ------------------------------------------

    def _table(self, what: str, kind: str, device: torch.device, build):
        """A mask-derived table, built once per (kind, device) on first use."""
        key = (what, kind, device)
        if key not in self._tables:
            self._tables[key] = build()
        return self._tables[key]

    def block_plan(self, kind: str, device: torch.device) -> BlockPlan:
        """How the full forward cuts a sparse layer into blocks (:mod:`dalle1.attention`)."""
        s = self.shape
        return self._table(
            "plan",
            kind,
            device,
            lambda: block_plan(kind, s.text_len + 1, s.grid, self.cfg.conv_kernel, device),
        )

    def key_table(self, kind: str, device: torch.device) -> tuple[torch.Tensor, list[int]]:
        """For decoding under a sparse kind: query position ``p`` may attend exactly the key
        positions ``index[p, :count[p]]`` (ascending), see :func:`dalle1.masks.key_table`."""

        def build():
            s = self.shape
            index, count = key_table(kind, s.text_len, s.grid, self.cfg.conv_kernel, device)
            return index, count.tolist()

        return self._table("keys", kind, device, build)

    def attn_mask(self, kind: str, start: int, stop: int) -> torch.Tensor:
        """Boolean rows of the stream mask for queries start … stop-1 against keys 0 … stop-1."""
        s = self.shape
        device = self.norm.weight.device
        return stream_rows(kind, s.text_len, s.grid, start, stop, self.cfg.conv_kernel, device)

    def attn_bias(self, kind: str, start: int, stop: int) -> torch.Tensor | None:
        """The same rows as an additive bias (B, H broadcast), for x-transformers' own forward;
        ``None`` for dense (x-transformers' causal mask)."""
        if kind == "dense":
            return None
        return mask_to_bias(self.attn_mask(kind, start, stop))[None, None]

    # --- the layers -------------------------------------------------------------------

    def run_layers(
        self, x: torch.Tensor, cache: Cache | None = None
    ) -> tuple[torch.Tensor, Cache | None]:
        """Send stream positions [start, start + n) through the layers; start = cached length.

        Without a cache this is the full forward (training, full recompute) of
        :meth:`_layer`, and the result is normed. With one, it is :meth:`decode_layers`
        (before the final norm, which :func:`dalle1.decoding.logits` applies with the head).
        """
        if cache is not None:
            return self.decode_layers(x, cache)
        for i, kind in enumerate(self.kinds):
            x = self._layer(i, kind, x)
        return self.norm(x), None

    def _layer(self, i: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        """Layer ``i`` over the whole stream (x: (B, S, dim) from position 0): causal
        ``scaled_dot_product_attention`` for dense, :func:`dalle1.attention.sparse_attention`
        (blocks whose cost follows the keys the mask allows) for row / column / conv."""
        dropout = self.cfg.dropout if self.training else 0.0
        if kind == "dense":  # the plain products pay (S, S) scores: only for short streams
            attend = dense_attention(dropout, flash=self.flash or x.shape[1] > PLAIN_DENSE_MAX)
        else:
            plan = self.block_plan(kind, x.device)

            def attend(q, k, v, project):
                return sparse_attention(q, k, v, plan, dropout, project=project, fused=self.flash)

        return self.layers[i](x, attend=attend)

    def decode_layers(self, x: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        """The cached path: positions [length, length + n) through every layer with
        :func:`dalle1.decoding.decode_layer`, their keys and values written into ``cache``.
        Returns the hidden states before the final norm, and the cache advanced by n."""
        start, stop = cache.length, cache.length + x.shape[1]
        if stop > cache.capacity:
            raise ValueError(f"cache holds {cache.capacity} positions; asked for {stop}")
        w = cache.weights or self.decode_weights()
        for i, (lw, kind) in enumerate(zip(w.layers, self.kinds)):
            if cache.keys[i] is None:  # first write: zeros (a static step reads them, masked)
                shape = (x.shape[0], w.heads, cache.capacity, w.dim_head)
                cache.keys[i] = x.new_zeros(shape, dtype=cache.dtype or x.dtype)
                cache.values[i] = x.new_zeros(shape, dtype=cache.dtype or x.dtype)
            if x.shape[1] == 1:
                read = self.key_reads(kind)[start]
            elif start == 0 and (kind == "dense" or stop <= self.shape.text_len + 1):
                read = None  # causal from position 0 (text attends text causally in every kind)
            else:
                read = self.attn_mask(kind, start, stop)
            k, v = cache.keys[i], cache.values[i]
            x = decode_layer(x, lw, w.heads, k, v, start, read, cache.parallel_from)
        return x, replace(cache, length=stop, weights=w)

    # --- decoding's view of the model (dalle1/decoding.py) ------------------------------

    def _apply(self, fn, recurse: bool = True):
        """``.to()`` / ``.cuda()`` / ``.half()`` replace the weights: drop what decoding derived
        from the old ones (it would keep them alive)."""
        self._decode_weights = None
        self._reads.clear()
        self._static_reads.clear()
        return super()._apply(fn, recurse)

    def decode_weights(self) -> DecodeWeights:
        """The weights one decode step reads, q/k/v stacked; rebuilt when a weight changes."""
        key = weights_fingerprint(list(self.parameters()))
        if self._decode_weights is None or self._decode_weights[0] != key:
            layers = [
                LayerWeights(
                    norm=_gain(norm).detach(),
                    qkv=Matrix.of(
                        torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
                    ),
                    out=_matrix(attn.to_out),
                    ff_norm=_gain(ff_norm).detach(),
                    ff_in=_matrix(ff.ff[0][0]),
                    ff_out=_matrix(ff.ff[2]),
                )
                for norm, attn, ff_norm, ff in map(_layer_parts, self.layers)
            ]
            weights = DecodeWeights(
                layers,
                self.norm.weight.detach(),
                self.norm.bias.detach(),
                _matrix(self.to_image_logits),
                self.image_emb.weight.detach(),
                self.row_pos.weight.detach(),
                self.col_pos.weight.detach(),
                heads=self.cfg.heads,
                grid=self.shape.grid,
                n_text=self.shape.text_len + 1,
            )
            self._decode_weights = (key, weights.pack())
        return self._decode_weights[1]

    def allowed_keys(self, kind: str) -> torch.Tensor:
        """The boolean stream mask of ``kind`` (S, S), on the CPU: what decoding may read."""
        s = self.shape
        with torch.device("cpu"):  # whatever the default device (the meta device included)
            return stream_mask(kind, s.text_len, s.grid, self.cfg.conv_kernel)

    def key_reads(self, kind: str) -> list[Read]:
        """Per stream position, how one decoded query reads its keys under ``kind``
        (:func:`dalle1.decoding.key_reads`); built once per kind and device."""
        device = self.norm.weight.device
        if (kind, device) not in self._reads:
            if kind == "dense":  # causal: one run, the whole prefix
                S = self.shape.text_len + self.shape.num_codes
                reads: list[Read] = [(slice(0, p + 1, 1),) for p in range(S)]
            else:
                reads = key_reads(self.allowed_keys(kind))
            self._reads[(kind, device)] = [
                r.to(device) if isinstance(r, torch.Tensor) else r for r in reads
            ]
        return self._reads[(kind, device)]

    def static_reads(self, dtype: torch.dtype) -> list[StaticReads | None]:
        """Per layer, the padded reads of :func:`dalle1.decoding.static_step` (None: dense)."""
        device = self.norm.weight.device
        out: list[StaticReads | None] = []
        for kind in self.kinds:
            if kind == "dense":
                out.append(None)
                continue
            key = (kind, device, dtype)
            if key not in self._static_reads:
                reads = StaticReads.from_mask(self.allowed_keys(kind))
                self._static_reads[key] = reads.to(device, dtype)
            out.append(self._static_reads[key])
        return out

    def _runner(self, mode: str | None, device: torch.device) -> StepRunner | None:
        """The compiled / CUDA-graph step for a new cache, or None for the eager step."""
        mode = decode_mode(mode, device)
        if mode == "eager":
            return None
        if mode == "compile" and self._compiled_step is None:
            try:
                self._compiled_step = torch.compile(static_step, dynamic=False, fullgraph=True)
            except Exception as error:  # torch.compile unsupported here
                StepRunner(mode).fail(error)
                return None
        return StepRunner(mode, self._compiled_step if mode == "compile" else None)

    # --- training ---------------------------------------------------------------------

    def forward(self, text: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text (B, L), codes (B, N) -> (text logits (B, L, Vt), image logits (B, N, Vi)).

        Text logits at position i predict t_{i+1}; image logits at position j predict c_{j+1}.
        """
        L = self.shape.text_len
        x = torch.cat([self.embed_text(text), self.embed_codes(codes[:, :-1])], dim=1)
        h, _ = self.run_layers(x)
        return self.to_text_logits(h[:, :L]), self.to_image_logits(h[:, L:])

    def loss(
        self, text: torch.Tensor, codes: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DALL-E's weighted cross-entropy: w · CE_text + (1 − w) · CE_image (paper: w = 1/8)."""
        text_logits, image_logits = self(text, codes)
        text_loss = cross_entropy(text_logits.flatten(0, 1), text.flatten())
        image_loss = cross_entropy(image_logits.flatten(0, 1), codes.flatten())
        w = self.cfg.text_loss_weight
        loss = w * text_loss + (1 - w) * image_loss
        return loss, {"text_loss": text_loss.detach(), "image_loss": image_loss.detach()}

    # --- inference --------------------------------------------------------------------

    def prefill(
        self,
        text: torch.Tensor,
        decode: str | None = None,
        cache_dtype: str | torch.dtype | None = None,
    ) -> tuple[torch.Tensor, Cache]:
        """Read the caption in one pass: -> (logits for the first code (B, Vi), cache).

        ``decode``: the step form the cache's steps use (:func:`dalle1.decoding.decode_mode`:
        ``eager | compile | graph | auto``; None = ``$DALLE1_DECODE`` or ``auto``).
        ``cache_dtype``: the keys' and values' dtype (:func:`dalle1.decoding.cache_dtype`;
        None = the model's ``cache_dtype`` attribute, else ``$DALLE1_CACHE_DTYPE``, else the
        weights' own).
        """
        capacity = self.shape.text_len + self.shape.num_codes  # the whole input stream
        depth = len(self.layers)
        runner = self._runner(decode, text.device)
        w = self.decode_weights()
        dtype = decoding.cache_dtype(cache_dtype or self.cache_dtype, w.dtype)
        # everything one step reads: the weights and every layer's keys and values
        per_layer = 2 * len(text) * w.heads * capacity * w.dim_head * dtype.itemsize
        parallel_from = decoding.parallel_read_bytes(w.nbytes() + depth * per_layer)
        empty = Cache([None] * depth, [None] * depth, 0, capacity, w, runner, dtype, parallel_from)
        h, cache = self.decode_layers(self.embed_text(text), empty)
        return decoding.logits(cache.weights, h[:, -1]), cache

    def step(self, code: torch.Tensor, index: int, cache: Cache) -> tuple[torch.Tensor, Cache]:
        """Feed code number ``index`` (B,) -> (logits for code index + 1 (B, Vi), cache).

        The cache is written in place (see :class:`Cache`).
        """
        n_text = self.shape.text_len + 1
        if cache.length != n_text + index:  # the eager step writes at length, a static one at index
            raise ValueError(
                f"cache holds {cache.length} positions, but code {index} is fed at stream "
                f"position {n_text + index}"
            )
        w = cache.weights or self.decode_weights()
        if cache.runner is not None and None not in cache.keys:
            at = torch.tensor([index], device=code.device)
            reads = self.static_reads(cache.keys[0].dtype)
            out = cache.runner(w, cache.keys, cache.values, reads, code, at)
            if out is not None:  # None: the compile / capture failed, decode eagerly
                return out, replace(cache, length=cache.length + 1, weights=w)
        grid = self.shape.grid
        # same sum, in the same order, as embed_codes (image + row + column)
        x = F.embedding(code, w.image_emb) + w.row_pos[index // grid] + w.col_pos[index % grid]
        h, cache = self.decode_layers(x[:, None], cache)
        return decoding.logits(w, h[:, -1]), cache

    def next_logits_uncached(self, text: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Full recompute: logits for code ``prefix.shape[1]`` given the caption and the codes before it."""
        x = torch.cat([self.embed_text(text), self.embed_codes(prefix)], dim=1)
        h, _ = self.run_layers(x)
        return self.to_image_logits(h[:, -1])

    def code_log_likelihood(self, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """log p(c_j | caption, c_<j) for every code: (B, N), in one forward pass."""
        _, image_logits = self(text, codes)
        log_probs = image_logits.float().log_softmax(-1)
        return log_probs.gather(-1, codes[..., None]).squeeze(-1)
