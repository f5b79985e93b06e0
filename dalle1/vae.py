"""The image tokenizer: a discrete VAE that turns an image into a grid of codes.

DALL-E 1 (paper section 2.1, "Stage One") compresses a 256x256 image into a
32x32 grid of tokens from a codebook of 8192, with a convolutional encoder and
decoder built from residual blocks and 8x downsampling. The transformer then
models these codes exactly like text.

Pieces, top to bottom:

* :class:`Encoder` / :class:`Decoder` — conv stacks, one design for every quantizer;
* quantizers (one module each, same interface), registered in ``QUANTIZERS``:
  ``gumbel`` (the paper's gumbel-softmax relaxation, section 2.1 / appendix A.2),
  ``vq`` (vector-quantize-pytorch ``VectorQuantize``, EMA codebook) and
  ``fsq`` (vector-quantize-pytorch ``FSQ``, finite scalar quantization);
* reconstruction losses: ``mse``, ``l1`` and the paper's logit-Laplace
  likelihood (appendix A.3);
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
from vector_quantize_pytorch import FSQ, VectorQuantize

from .config import VAEConfig, resolve_fsq_levels

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

# --- gumbel-softmax (the paper's relaxation) ---------------------------------------------


def cosine_ramp(step: int, steps: int) -> float:
    """0 at step 0 -> 1 at ``steps`` (and after), following half a cosine."""
    if steps <= 0 or step >= steps:
        return 1.0
    return 0.5 * (1 - math.cos(math.pi * max(step, 0) / steps))


def tau_at(step: int, cfg: VAEConfig) -> float:
    """Gumbel-softmax temperature: cosine anneal ``gumbel_tau_start -> gumbel_tau_end``
    over ``gumbel_tau_steps`` updates (paper appendix A.2: 1 -> 1/16 over 150k)."""
    r = cosine_ramp(step, cfg.gumbel_tau_steps)
    return cfg.gumbel_tau_start + (cfg.gumbel_tau_end - cfg.gumbel_tau_start) * r


def beta_at(step: int, cfg: VAEConfig) -> float:
    """KL weight: cosine ramp 0 -> ``gumbel_kl_weight`` over ``gumbel_kl_steps`` updates
    (paper appendix A.2: 0 -> 6.6 over the first 5k)."""
    return cfg.gumbel_kl_weight * cosine_ramp(step, cfg.gumbel_kl_steps)


class GumbelQuantizer(nn.Module):
    """DALL-E 1's relaxation of the discrete bottleneck (paper section 2.1, appendix A.2).

    The encoder outputs logits over the ``codebook_size`` codes at every grid
    cell. Training samples a relaxed one-hot with the gumbel-softmax at
    temperature τ (``tau_at``) and feeds ``soft_one_hot @ codebook`` to the
    decoder; the ELB's KL term to the uniform prior over codes is weighted by
    β (``beta_at``). With ``gumbel_straight_through`` the forward pass uses the
    hard one-hot and the gradient the soft one. At inference the code is the
    argmax of the logits.

    The KL is summed over grid cells and divided by the number of pixel values
    per image (C·H·W), because the reconstruction losses are means over pixel
    values: that keeps the paper's ratio between a per-image log-likelihood sum
    and a per-image KL sum, so β = 6.6 means what it means in the paper.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.in_dim = cfg.codebook_size
        self.out_dim = cfg.codebook_dim
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)
        self.pixels_per_image = cfg.channels * cfg.image_size**2

    def forward(
        self, logits: torch.Tensor, step: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        tau, beta = tau_at(step, self.cfg), beta_at(step, self.cfg)
        one_hot = F.gumbel_softmax(logits, tau=tau, hard=self.cfg.gumbel_straight_through, dim=1)
        quantized = torch.einsum("bkhw,kd->bdhw", one_hot, self.codebook.weight)
        log_q = F.log_softmax(logits, dim=1)
        # KL(q || uniform) = sum_k q_k (log q_k + log K), per grid cell
        kl_cells = (log_q.exp() * (log_q + math.log(logits.shape[1]))).sum(1)
        kl = kl_cells.flatten(1).sum(1).mean() / self.pixels_per_image
        stats = {"tau": tau, "beta": beta, "kl": kl.item()}
        return quantized, logits.argmax(1).flatten(1), beta * kl, stats

    @torch.no_grad()
    def indices(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1).flatten(1)

    def embed(self, indices: torch.Tensor, grid: int) -> torch.Tensor:
        return rearrange(self.codebook(indices), "b (h w) d -> b d h w", h=grid)


# --- VQ (vector-quantize-pytorch, EMA codebook) ------------------------------------------


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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        quantized, indices, commit = self.vq(z)
        return quantized, indices.flatten(1), commit.sum(), {}

    @torch.no_grad()
    def indices(self, z: torch.Tensor) -> torch.Tensor:
        # freeze_codebook: vector-quantize-pytorch updates its EMA codebook whenever the module
        # is in train mode, gradients or not; a "frozen" VAE inside transformer training would
        # otherwise drift and silently change the targets
        _, indices, _ = self.vq(z, freeze_codebook=True)
        return indices.flatten(1)

    def embed(self, indices: torch.Tensor, grid: int) -> torch.Tensor:
        codes = self.vq.project_out(self.vq.codebook[indices])  # (B, N, D)
        return rearrange(codes, "b (h w) d -> b d h w", h=grid)


# --- FSQ -------------------------------------------------------------------------------


class FSQQuantizer(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023) via vector-quantize-pytorch ``FSQ``.

    Not in the DALL-E paper: a modern alternative with no codebook to learn
    (so nothing can go unused or drift) and no auxiliary loss. The encoder's
    ``codebook_dim`` features are projected to ``len(levels)`` bounded scalars,
    each rounded to one of its levels; a code is the tuple of levels, so the
    implied codebook size is the product of the levels.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.levels = resolve_fsq_levels(cfg)
        self.in_dim = self.out_dim = cfg.codebook_dim
        self.fsq = FSQ(levels=self.levels, dim=cfg.codebook_dim, channel_first=True)

    def forward(
        self, z: torch.Tensor, step: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        quantized, indices = self.fsq(z)
        return quantized, indices.flatten(1).long(), z.new_zeros(()), {}

    @torch.no_grad()
    def indices(self, z: torch.Tensor) -> torch.Tensor:
        return self.fsq(z)[1].flatten(1).long()

    def embed(self, indices: torch.Tensor, grid: int) -> torch.Tensor:
        return self.fsq.indices_to_codes(rearrange(indices, "b (h w) -> b h w", h=grid))


QUANTIZERS: dict[str, type[nn.Module]] = {
    "vq": VQQuantizer,
    "fsq": FSQQuantizer,
    "gumbel": GumbelQuantizer,
}


# ---------------------------------------------------------------------------
# Reconstruction losses
# ---------------------------------------------------------------------------


def output_channels(cfg: VAEConfig) -> int:
    """The paper's logit-Laplace likelihood needs a location and a scale per colour channel."""
    return cfg.channels * 2 if cfg.recon_loss == "logit_laplace" else cfg.channels


def map_pixels(images: torch.Tensor, eps: float) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps] (paper appendix A.3), so that logit(x) stays finite."""
    return (1 - 2 * eps) * images + eps


def unmap_pixels(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Inverse of :func:`map_pixels`, clamped to [0, 1]."""
    return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)


#: lower bound on the logit-Laplace log-scale, so a confident decoder cannot divide by ~0
LOG_SCALE_MIN = -7.0


def logit_laplace_nll(out: torch.Tensor, images: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Mean negative log-likelihood of ``images`` under the logit-Laplace distribution.

    Paper appendix A.3: pixels are squashed to x = (1-2ε)·pixel + ε; the decoder
    predicts, per colour channel, a location μ (``out[:, :C]``) and a log-scale
    ln b (``out[:, C:]``) in logit space. The density on (0, 1) is

        f(x | μ, b) = exp(-|logit(x) - μ| / b) / (2b · x(1 - x))

    so the NLL per value is ``ln(2b) + ln(x(1-x)) + |logit(x) - μ| / b``,
    averaged over all values. The ``ln(x(1-x))`` term does not depend on the
    model but makes this a proper density (it is the change of variables from
    a Laplace in logit space).
    """
    c = images.shape[1]
    if out.shape[1] != 2 * c:
        raise ValueError(
            f"logit-Laplace needs {2 * c} decoder channels (location and log-scale), got {out.shape[1]}"
        )
    mu, log_b = out[:, :c], out[:, c:].clamp(min=LOG_SCALE_MIN)
    x = map_pixels(images, eps)
    logit_x = torch.log(x) - torch.log1p(-x)
    nll = math.log(2) + log_b + torch.log(x * (1 - x)) + (logit_x - mu).abs() * torch.exp(-log_b)
    return nll.mean()


def reconstruction_loss(
    out: torch.Tensor, images: torch.Tensor, kind: str, eps: float = 0.1
) -> torch.Tensor:
    """``mse`` / ``l1`` on pixels, or the paper's ``logit_laplace`` negative log-likelihood."""
    if kind == "mse":
        return F.mse_loss(out, images)
    if kind == "l1":
        return F.l1_loss(out, images)
    if kind == "logit_laplace":
        return logit_laplace_nll(out, images, eps)
    raise ValueError(f"unknown reconstruction loss '{kind}'")


def output_to_image(out: torch.Tensor, cfg: VAEConfig) -> torch.Tensor:
    """Decoder output -> image in [0, 1].

    For ``logit_laplace`` the image is sigmoid(μ) mapped back from [ε, 1-ε]
    (the distribution's median), as in OpenAI's released dVAE.
    """
    if cfg.recon_loss == "logit_laplace":
        return unmap_pixels(torch.sigmoid(out[:, : cfg.channels]), cfg.logit_laplace_eps)
    return out[:, : cfg.channels].clamp(0, 1)


# ---------------------------------------------------------------------------
# The discrete VAE
# ---------------------------------------------------------------------------


class DiscreteVAE(nn.Module):
    """The image tokenizer: :class:`Encoder`, one quantizer of ``QUANTIZERS``, :class:`Decoder`.

    ``encode(images (B, 3, H, W) in [0, 1]) -> codes (B, grid²)`` in raster order,
    ``decode(codes) -> images``, and ``forward(images, step)`` the training loss. The
    grid is ``image_size / 2**num_downsamples`` codes per side (paper: 256 px -> 32),
    each code one of ``codebook_size`` (paper: 8192).
    """

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
        """Training pass: returns (loss, logs).

        ``logs`` holds ``recon_loss``, ``aux_loss`` (commitment for vq, β·KL for
        gumbel, 0 for fsq), ``codes``, the reconstruction ``images`` and the
        quantizer's own scalars (gumbel: ``tau``, ``beta``, ``kl``). ``step``
        drives the gumbel τ / β schedules.
        """
        quantized, indices, aux, stats = self.quantizer(self.encoder(images * 2 - 1), step)
        out = self.decoder(quantized)
        recon = reconstruction_loss(
            out, images, self.cfg.recon_loss, eps=self.cfg.logit_laplace_eps
        )
        logs = {
            "recon_loss": recon.detach(),
            "aux_loss": aux.detach(),
            "codes": indices.detach(),
            "images": output_to_image(out.detach(), self.cfg),
            **{k: torch.tensor(float(v)) for k, v in stats.items()},
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
