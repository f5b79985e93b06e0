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
and :meth:`DALLE._decode_layer` for decoding with the key/value cache
(``prefill`` / ``step``), with preallocated buffers and, under a sparse mask,
only the keys the mask allows. The tests hold both to x-transformers' own
forward with the whole mask as a bias (≤ 1e-5 and ≤ 1e-4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from x_transformers import Decoder
from x_transformers.x_transformers import LayerNorm as XLayerNorm

from .attention import BlockPlan, block_plan, sparse_attention
from .config import DALLEConfig
from .masks import KINDS, key_table, layer_kinds, mask_to_bias, stream_rows


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


def dense_attention(dropout_p: float = 0.0) -> Attend:
    """Plain causal attention over the whole stream (``attention: dense``)."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, project: nn.Module):
        b, n, heads, d = q.shape
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, S, d)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        return project(out.transpose(1, 2).reshape(b, n, heads * d))

    return attend


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
        h = norm(x)
        q, k, v = (proj(h).view(b, n, attn.heads, -1) for proj in (attn.to_q, attn.to_k, attn.to_v))
        x = x + attend(q, k, v, attn.to_out)
        return x + ff(ff_norm(x))


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
    branch two continuations from one prefix.
    """

    keys: list  # per layer: Tensor (B, heads, capacity, dim_head), allocated on first write
    values: list
    length: int
    capacity: int

    def clone(self) -> Cache:
        def copy(buffers: list) -> list:
            return [None if t is None else t.clone() for t in buffers]

        return Cache(copy(self.keys), copy(self.values), self.length, self.capacity)


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
        # _layer (full forward) and _decode_layer (cached decoding) run their arithmetic,
        # so a new Decoder option must be mirrored there (tests/test_transformer.py holds
        # both to x-transformers' own forward).
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

    def reset_parameters(self) -> None:
        """The model's own state that is not a parameter: the mask-derived tables, which
        are dropped here and rebuilt on first use (so nothing needs restoring after
        ``to_empty``). Parameters are left to the sub-modules (:func:`init_weights`)."""
        self._tables = {}

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
        :meth:`_layer`. With one, it is the decoding path of :meth:`_decode_layer`, which
        writes into the cache.
        """
        if cache is not None:
            start, stop = cache.length, cache.length + x.shape[1]
            if stop > cache.capacity:
                raise ValueError(f"cache holds {cache.capacity} positions; asked for {stop}")
            for i, kind in enumerate(self.kinds):
                x = self._decode_layer(i, kind, x, cache, start)
            return self.norm(x), Cache(cache.keys, cache.values, stop, cache.capacity)
        for i, kind in enumerate(self.kinds):
            x = self._layer(i, kind, x)
        return self.norm(x), None

    def _layer(self, i: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        """Layer ``i`` over the whole stream (x: (B, S, dim) from position 0): causal
        ``scaled_dot_product_attention`` for dense, :func:`dalle1.attention.sparse_attention`
        (blocks whose cost follows the keys the mask allows) for row / column / conv."""
        dropout = self.cfg.dropout if self.training else 0.0
        if kind == "dense":
            attend = dense_attention(dropout)
        else:
            plan = self.block_plan(kind, x.device)

            def attend(q, k, v, project):
                return sparse_attention(q, k, v, plan, dropout, project=project)

        return self.layers[i](x, attend=attend)

    def _decode_layer(
        self, i: int, kind: str, x: torch.Tensor, cache: Cache, start: int
    ) -> torch.Tensor:
        """One pre-norm layer for new positions [start, start + n), reading/writing the cache.

        The same arithmetic as the x-transformers ``Decoder`` layer built in ``__init__``
        (LayerNorm -> q, k, v -> softmax(q k^T / sqrt(d)) v -> out, residual; LayerNorm ->
        feed-forward, residual), written out because its generic forward costs more Python
        time per decoded token than the maths itself on a small model, and because it
        concatenates the whole cache at every step. Two shortcuts, both exact:

        * keys and values go into preallocated buffers (no concatenation);
        * a single query under a sparse DALL-E mask (row / column / conv) attends only
          the key positions its mask allows (about L + grid of them, not all L + N):
          a masked key contributes exp(-inf) = 0 to the softmax, so dropping it changes
          nothing but the work. tests/test_transformer.py checks this path against the
          x-transformers forward.
        """
        norm, attn, ff_norm, ff = _layer_parts(self.layers[i])
        b, n, _ = x.shape
        stop = start + n
        h = norm(x)
        q, k, v = (
            proj(h).view(b, n, attn.heads, -1).transpose(1, 2)
            for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        if cache.keys[i] is None:  # first write: allocate with the dtype autocast gave k, v
            cache.keys[i] = k.new_empty(b, attn.heads, cache.capacity, k.shape[-1])
            cache.values[i] = v.new_empty(b, attn.heads, cache.capacity, v.shape[-1])
        keys, values = cache.keys[i], cache.values[i]
        keys[:, :, start:stop] = k
        values[:, :, start:stop] = v
        mask = None
        if n == 1 and kind != "dense":
            table, count = self.key_table(kind, x.device)
            index = table[start, : count[start]]
            keys, values = keys.index_select(2, index), values.index_select(2, index)
        else:
            keys, values = keys[:, :, :stop], values[:, :, :stop]
            if n > 1:
                mask = self.attn_mask(kind, start, stop)
        out = F.scaled_dot_product_attention(
            q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask
        )
        x = x + attn.to_out(out.transpose(1, 2).reshape(b, n, -1))
        return x + ff(ff_norm(x))

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
        text_loss = F.cross_entropy(text_logits.flatten(0, 1).float(), text.flatten())
        image_loss = F.cross_entropy(image_logits.flatten(0, 1).float(), codes.flatten())
        w = self.cfg.text_loss_weight
        loss = w * text_loss + (1 - w) * image_loss
        return loss, {"text_loss": text_loss.detach(), "image_loss": image_loss.detach()}

    # --- inference --------------------------------------------------------------------

    def prefill(self, text: torch.Tensor) -> tuple[torch.Tensor, Cache]:
        """Read the caption in one pass: -> (logits for the first code (B, Vi), cache)."""
        capacity = self.shape.text_len + self.shape.num_codes  # the whole input stream
        empty = Cache([None] * len(self.layers), [None] * len(self.layers), 0, capacity)
        h, cache = self.run_layers(self.embed_text(text), empty)
        return self.to_image_logits(h[:, -1]), cache

    def step(self, code: torch.Tensor, index: int, cache: Cache) -> tuple[torch.Tensor, Cache]:
        """Feed code number ``index`` (B,) -> (logits for code index + 1 (B, Vi), cache).

        The cache is written in place (see :class:`Cache`).
        """
        grid = self.shape.grid
        # same sum, in the same order, as embed_codes (image + row + column)
        x = (
            self.image_emb(code)
            + self.row_pos.weight[index // grid]
            + self.col_pos.weight[index % grid]
        )
        h, cache = self.run_layers(x[:, None], cache)
        return self.to_image_logits(h[:, -1]), cache

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
