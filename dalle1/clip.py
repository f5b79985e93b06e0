"""A small CLIP-style scorer: does this image show this caption? (paper section 2.6)

DALL-E 1 (paper section 2.6, "Sample Generation", and figure 9) draws many
candidates per caption and reranks them with a pretrained contrastive model
(CLIP, Radford et al. 2021); the blog shows the best 32 of 512. No CLIP
weights can be downloaded here, so dalle1 trains its own on the same
captioned data (``train.stage: clip``, :mod:`dalle1.training`):

* **Text encoder**: the transformer's own BPE ids (same ``tokenizer.json``,
  same per-position pads), a learned position per slot, an x-transformers
  bidirectional ``Encoder`` with the pads masked out, mean-pooled over a
  learned ``[cls]`` slot and the real tokens.
* **Image encoder: pixels, not VAE codes.** (1) The scorer then judges what
  the user actually sees, decoding errors of the VAE included; a code-level
  scorer would be blind to them. (2) ``classify``, ``eval`` and ``synth`` can
  score *any* image file without first pushing it through the VAE. (3) The
  scorer stays valid when the image tokenizer is retrained, and it is what
  the paper's CLIP reads. At 32 px a few strided convolutions cost about as
  much as embedding the 64 codes would. The final feature map is flattened
  (not averaged), so "at the top left" stays visible to the projection.
* **Loss**: symmetric InfoNCE with a learned temperature (CLIP section 2.3;
  logit scale initialised at 1/0.07 and clipped at 100). Captions in small
  datasets repeat inside a batch ("a red circle" twice); such pairs count as
  matches instead of as negatives (:func:`clip_loss` ``same=``).

The score of an (image, caption) pair is the cosine similarity of their
embeddings, in [-1, 1]. The same embeddings classify images zero-shot
(:func:`zero_shot`: one caption per label, averaged over templates).
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn
from x_transformers import Encoder

from .config import CLIPConfig
from .text import TextTokenizer

MAX_LOGIT_SCALE = 100.0  # CLIP: the learned temperature is clipped so logits never exceed 100x

# --- the loss ----------------------------------------------------------------------------


def clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    same: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP section 2.3): mean of image->text and text->image cross-entropy.

    image_emb, text_emb: (B, D) L2-normalised rows; row i of each is a matching pair.
    logit_scale: the *log* of the inverse temperature (logits = exp(scale) · cos).
    same: optional bool (B, B), True where caption j also describes image i (e.g. the same
          text); the target of row i is then spread uniformly over those columns. Default:
          the identity, which is plain InfoNCE.
    """
    scale = torch.as_tensor(logit_scale, dtype=image_emb.dtype, device=image_emb.device)
    logits = scale.exp() * image_emb @ text_emb.t()
    if same is None:
        target = torch.arange(len(logits), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    same = same.to(logits.device, torch.bool) | torch.eye(
        len(logits), dtype=torch.bool, device=logits.device
    )
    soft = same.float() / same.float().sum(-1, keepdim=True)
    soft_t = same.t().float() / same.t().float().sum(-1, keepdim=True)
    i2t = -(soft * logits.log_softmax(-1)).sum(-1).mean()
    t2i = -(soft_t * logits.t().log_softmax(-1)).sum(-1).mean()
    return 0.5 * (i2t + t2i)


def same_text(text: torch.Tensor) -> torch.Tensor:
    """(B, L) token ids -> bool (B, B): True where two rows are the same caption."""
    return (text[:, None, :] == text[None, :, :]).all(-1)


# --- the model ---------------------------------------------------------------------------


class ImageEncoder(nn.Module):
    """Strided convolutions over pixels in [0, 1]; the last feature map is flattened."""

    def __init__(self, cfg: CLIPConfig, image_size: int):
        super().__init__()
        if image_size % (2**cfg.image_downsamples) != 0:
            raise ValueError(
                f"clip.image_size={image_size} is not divisible by 2**clip.image_downsamples="
                f"{2**cfg.image_downsamples}"
            )
        c = cfg.image_channels
        layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1), nn.GELU()]
        for _ in range(cfg.image_downsamples):
            layers += [
                nn.Conv2d(c, 2 * c, 4, stride=2, padding=1),
                nn.GroupNorm(8 if (2 * c) % 8 == 0 else 1, 2 * c),
                nn.GELU(),
                nn.Conv2d(2 * c, 2 * c, 3, padding=1),
                nn.GELU(),
            ]
            c *= 2
        self.convs = nn.Sequential(*layers)
        side = image_size // 2**cfg.image_downsamples
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.LayerNorm(c * side * side),
            nn.Linear(c * side * side, cfg.dim),
            nn.GELU(),
            nn.Linear(cfg.dim, cfg.embed_dim),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(images * 2 - 1))


class TextEncoder(nn.Module):
    """BPE ids (B, L) -> (B, embed_dim): bidirectional transformer, pads masked, mean-pooled."""

    def __init__(self, cfg: CLIPConfig, text_vocab: int, text_len: int, bpe_vocab: int):
        super().__init__()
        self.bpe_vocab = bpe_vocab
        self.token_emb = nn.Embedding(text_vocab, cfg.dim)
        self.pos_emb = nn.Embedding(text_len + 1, cfg.dim)  # [cls] + L slots
        self.cls = nn.Parameter(torch.randn(cfg.dim) * 0.02)
        self.encoder = Encoder(
            dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, attn_dim_head=cfg.dim_head
        )
        self.proj = nn.Linear(cfg.dim, cfg.embed_dim)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        b, n = text.shape
        x = torch.cat([self.cls.expand(b, 1, -1), self.token_emb(text)], dim=1)
        x = x + self.pos_emb(torch.arange(n + 1, device=text.device))
        mask = torch.cat([torch.ones_like(text[:, :1], dtype=torch.bool), text < self.bpe_vocab], 1)
        h = self.encoder(x, mask=mask)
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.proj(pooled)


class CLIPScorer(nn.Module):
    """The contrastive scorer: ``similarity(images, text)`` is the cosine of the two embeddings."""

    def __init__(
        self, cfg: CLIPConfig, text_vocab: int, text_len: int, bpe_vocab: int, image_size: int
    ):
        super().__init__()
        self.cfg = cfg
        self.text_vocab, self.text_len, self.bpe_vocab = text_vocab, text_len, bpe_vocab
        self.image_size = image_size
        self.image_encoder = ImageEncoder(cfg, image_size)
        self.text_encoder = TextEncoder(cfg, text_vocab, text_len, bpe_vocab)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))

    def export_config(self) -> dict:
        return {
            **asdict(self.cfg),
            "text_vocab": self.text_vocab,
            "text_len": self.text_len,
            "bpe_vocab": self.bpe_vocab,
            "image_size": self.image_size,
        }

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> clamped and resized to the encoder's size."""
        images = images.float().clamp(0, 1).to(self.device)
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(
                images, size=(self.image_size,) * 2, mode="bilinear", antialias=True
            )
        return images

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_encoder(self.prepare(images)), dim=-1)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_encoder(text.to(self.device)), dim=-1)

    def clamped_scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE))

    def forward(
        self, images: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training: -> (symmetric InfoNCE, logs) for a batch of matching (image, caption) rows."""
        img, txt = self.encode_image(images), self.encode_text(text)
        scale = self.clamped_scale()
        loss = clip_loss(img, txt, scale, same_text(text))
        with torch.no_grad():
            acc = ((img @ txt.t()).argmax(-1) == torch.arange(len(img), device=img.device)).float()
        return loss, {"batch_acc": acc.mean(), "temperature": (-scale).exp().detach()}

    @torch.no_grad()
    def similarity(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Row-wise cosine similarity of image i and caption i: (B,)."""
        return (self.encode_image(images) * self.encode_text(text)).sum(-1)


# --- zero-shot classification --------------------------------------------------------------


def label_texts(labels: list[str], templates: list[str]) -> list[list[str]]:
    """Every label in every template; each template must contain '{}' exactly once."""
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"template {template!r} must contain '{{}}' exactly once")
    return [[t.format(label).strip() for t in templates] for label in labels]


@torch.no_grad()
def label_embeddings(
    clip: CLIPScorer, tokenizer: TextTokenizer, labels: list[str], templates: list[str]
) -> torch.Tensor:
    """(C, D) class embeddings; several templates are averaged (CLIP's prompt ensembling, §3.1.4)."""
    texts = label_texts(labels, templates)
    for row in texts:
        for text in row:
            if tokenizer.num_tokens(text) == 0:
                raise ValueError(f"label text {text!r} tokenizes to nothing")
    flat = [t for row in texts for t in row]
    emb = clip.encode_text(tokenizer.encode(flat)).view(len(labels), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


@torch.no_grad()
def zero_shot(
    clip: CLIPScorer,
    tokenizer: TextTokenizer,
    images: torch.Tensor,
    labels: list[str],
    templates: list[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """Images (B, 3, H, W) -> class probabilities (B, C): softmax of exp(scale) · cosine."""
    classes = label_embeddings(clip, tokenizer, labels, templates)
    out = []
    for i in range(0, len(images), batch_size):
        img = clip.encode_image(images[i : i + batch_size])
        out.append((clip.clamped_scale().exp() * img @ classes.t()).softmax(-1))
    return torch.cat(out).cpu()
