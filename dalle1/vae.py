"""The image tokenizer: a discrete VAE that turns an image into a grid of codes.

DALL-E 1 (paper section 2.1, "Stage One") compresses a 256x256 image into a
32x32 grid of tokens from a codebook of 8192, with a convolutional encoder and
decoder built from residual blocks and 8x downsampling. The transformer then
models these codes exactly like text.

Pieces, top to bottom:

* :class:`Encoder` / :class:`Decoder` — conv stacks, one design for every quantizer;
* quantizers (one module each, same interface): ``vq`` (vector-quantize-pytorch
  ``VectorQuantize``, EMA codebook), plus the others registered in ``QUANTIZERS``;
* :class:`DiscreteVAE` — ``encode(images) -> codes (B, grid²)``,
  ``decode(codes) -> images``, and ``forward`` returning the training loss.

Images are float tensors in [0, 1]; codes are LongTensors in raster order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from vector_quantize_pytorch import VectorQuantize

from .config import VAEConfig

# ---------------------------------------------------------------------------
# Encoder and decoder
# ---------------------------------------------------------------------------


class ResBlock(nn.Module):
    """Pre-activation residual block (the dVAE's blocks have no normalisation either)."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(channels // 4, 16)  # bottleneck, as in the released dVAE
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class Encoder(nn.Module):
    """image (B, 3, H, W) -> features (B, out_dim, H/2^n, W/2^n)."""

    def __init__(self, cfg: VAEConfig, out_dim: int):
        super().__init__()
        width = cfg.hidden_dim
        layers: list[nn.Module] = [nn.Conv2d(cfg.channels, width, 3, padding=1)]
        for _ in range(cfg.num_downsamples):
            layers += [ResBlock(width) for _ in range(cfg.num_res_blocks)]
            layers += [nn.Conv2d(width, width * 2, 4, stride=2, padding=1)]
            width *= 2
        layers += [ResBlock(width) for _ in range(cfg.num_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(width, out_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """code vectors (B, in_dim, g, g) -> pixel parameters (B, out_channels, H, W)."""

    def __init__(self, cfg: VAEConfig, in_dim: int, out_channels: int):
        super().__init__()
        width = cfg.hidden_dim * 2**cfg.num_downsamples
        layers: list[nn.Module] = [nn.Conv2d(in_dim, width, 1)]
        layers += [ResBlock(width) for _ in range(cfg.num_res_blocks)]
        for _ in range(cfg.num_downsamples):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(width, width // 2, 3, padding=1),
            ]
            width //= 2
            layers += [ResBlock(width) for _ in range(cfg.num_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(width, out_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


# ---------------------------------------------------------------------------
# Quantizers: features -> (code vectors, indices, auxiliary loss)
# ---------------------------------------------------------------------------


class VQQuantizer(nn.Module):
    """Nearest-neighbour codebook with EMA updates (vector-quantize-pytorch).

    k-means initialisation, dead-code replacement and a slower EMA decay are
    switched on, because the library's defaults (decay 0.8, no dead-code
    replacement) leave most of a tokenizer's codebook unused.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.in_dim = self.out_dim = cfg.codebook_dim
        # codebook_dim == dim: with accept_image_fmap and a projection the
        # library's get_output_from_indices is wrong; we also decode ourselves.
        self.vq = VectorQuantize(
            dim=cfg.codebook_dim,
            codebook_size=cfg.codebook_size,
            decay=cfg.vq_decay,
            commitment_weight=cfg.vq_commitment_weight,
            kmeans_init=cfg.vq_kmeans_init,
            threshold_ema_dead_code=cfg.vq_dead_code_threshold,
            use_cosine_sim=cfg.vq_cosine,
            accept_image_fmap=True,
        )

    def forward(
        self, z: torch.Tensor, step: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        quantized, indices, commit = self.vq(z)
        return quantized, indices.flatten(1), commit.sum()

    @torch.no_grad()
    def indices(self, z: torch.Tensor) -> torch.Tensor:
        # freeze_codebook: the EMA update runs in train mode even without gradients (DESIGN §4)
        _, indices, _ = self.vq(z, freeze_codebook=True)
        return indices.flatten(1)

    def embed(self, indices: torch.Tensor, grid: int) -> torch.Tensor:
        codes = self.vq.project_out(self.vq.codebook[indices])  # (B, N, D)
        return rearrange(codes, "b (h w) d -> b d h w", h=grid)


QUANTIZERS: dict[str, type[nn.Module]] = {"vq": VQQuantizer}


# ---------------------------------------------------------------------------
# Reconstruction losses
# ---------------------------------------------------------------------------


def output_channels(cfg: VAEConfig) -> int:
    """The paper's logit-Laplace likelihood needs a location and a scale per colour channel."""
    return cfg.channels * 2 if cfg.recon_loss == "logit_laplace" else cfg.channels


def reconstruction_loss(out: torch.Tensor, images: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(out, images)
    if kind == "l1":
        return F.l1_loss(out, images)
    raise ValueError(f"unknown reconstruction loss '{kind}'")


def output_to_image(out: torch.Tensor, cfg: VAEConfig) -> torch.Tensor:
    """Decoder output -> image in [0, 1]."""
    return out[:, : cfg.channels].clamp(0, 1)


# ---------------------------------------------------------------------------
# The discrete VAE
# ---------------------------------------------------------------------------


class DiscreteVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        if cfg.quantizer not in QUANTIZERS:
            raise ValueError(
                f"vae.quantizer '{cfg.quantizer}' is not one of {', '.join(QUANTIZERS)}"
            )
        self.cfg = cfg
        self.quantizer = QUANTIZERS[cfg.quantizer](cfg)
        self.encoder = Encoder(cfg, self.quantizer.in_dim)
        self.decoder = Decoder(cfg, self.quantizer.out_dim, output_channels(cfg))

    @property
    def grid_size(self) -> int:
        return self.cfg.image_size // 2**self.cfg.num_downsamples

    @property
    def num_codes(self) -> int:
        return self.grid_size**2

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> codes (B, grid²). Never changes the codebook."""
        return self.quantizer.indices(self.encoder(images * 2 - 1))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, grid²) -> images (B, 3, H, W) in [0, 1]."""
        return output_to_image(self.decoder(self.quantizer.embed(codes, self.grid_size)), self.cfg)

    def forward(
        self, images: torch.Tensor, step: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training pass: returns (loss, logs) with logs holding recon, aux, codes and the reconstruction."""
        quantized, indices, aux = self.quantizer(self.encoder(images * 2 - 1), step)
        out = self.decoder(quantized)
        recon = reconstruction_loss(out, images, self.cfg.recon_loss)
        logs = {
            "recon_loss": recon.detach(),
            "aux_loss": aux.detach(),
            "codes": indices.detach(),
            "images": output_to_image(out.detach(), self.cfg),
        }
        return recon + aux, logs


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def psnr(reconstruction: torch.Tensor, images: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1]."""
    mse = F.mse_loss(reconstruction.float(), images.float()).item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Fraction of codes used and the perplexity of their empirical distribution."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).float()
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum().item()
    return {"usage": (counts > 0).float().mean().item(), "perplexity": math.exp(entropy)}
