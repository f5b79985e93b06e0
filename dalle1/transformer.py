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

Each layer is an x-transformers ``Decoder`` of depth one, so that every layer
can be given its own DALL-E attention mask (row / column / conv, see
:mod:`dalle1.masks`) as an additive bias, which x-transformers also honours
when decoding with its key/value cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from x_transformers import Decoder

from .config import DALLEConfig
from .masks import layer_kinds, mask_to_bias, stream_mask


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


@dataclass
class Cache:
    """Per-layer x-transformers key/value caches plus the stream length they cover."""

    layers: list
    length: int


class DALLE(nn.Module):
    def __init__(self, cfg: DALLEConfig, shape: StreamShape):
        super().__init__()
        self.cfg, self.shape = cfg, shape
        dim = cfg.dim
        self.text_emb = nn.Embedding(shape.text_vocab, dim)
        self.image_emb = nn.Embedding(shape.image_vocab, dim)
        self.text_pos = nn.Embedding(shape.text_len + 1, dim)  # <bos> + L slots
        self.row_pos = nn.Embedding(shape.grid, dim)
        self.col_pos = nn.Embedding(shape.grid, dim)
        self.layers = nn.ModuleList(
            Decoder(
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
        self.kinds = layer_kinds(cfg.depth, cfg.attention)
        for kind in set(self.kinds) - {"dense"}:
            bias = mask_to_bias(stream_mask(kind, shape.text_len, shape.grid, cfg.conv_kernel))
            self.register_buffer(f"bias_{kind}", bias, persistent=False)

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

    def attn_bias(self, kind: str, start: int, stop: int) -> torch.Tensor | None:
        """Bias rows for query positions start … stop-1 against keys 0 … stop-1."""
        if kind == "dense":
            return None  # plain causal attention: x-transformers' own causal mask
        return getattr(self, f"bias_{kind}")[start:stop, :stop][None, None]

    def run_layers(self, x: torch.Tensor, cache: Cache | None = None) -> tuple[torch.Tensor, Cache]:
        """Send stream positions [start, start + n) through the layers; start = cached length."""
        start = cache.length if cache is not None else 0
        stop = start + x.shape[1]
        new_caches = []
        for i, (layer, kind) in enumerate(zip(self.layers, self.kinds)):
            layer_cache = cache.layers[i] if cache is not None else None
            bias = self.attn_bias(kind, start, stop)
            if bias is not None:
                bias = bias.to(x.dtype)
            x, inter = layer(x, attn_bias=bias, cache=layer_cache, return_hiddens=True)
            new_caches.append(inter)
        return self.norm(x), Cache(new_caches, stop)

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
        h, cache = self.run_layers(self.embed_text(text))
        return self.to_image_logits(h[:, -1]), cache

    def step(self, code: torch.Tensor, index: int, cache: Cache) -> tuple[torch.Tensor, Cache]:
        """Feed code number ``index`` (B,) -> (logits for code index + 1 (B, Vi), cache)."""
        h, cache = self.run_layers(self.embed_codes(code[:, None], index), cache)
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
