"""The Lightning systems: one LightningModule per training stage (paper section 2).

``stage: vae`` trains the image tokenizer (:class:`VAEModule`), ``stage: dalle``
the transformer over [text | image] tokens with the tokenizer frozen
(:class:`DALLEModule`, with caption dropout for classifier-free guidance), and
``stage: clip`` the reranking scorer (:class:`CLIPModule`). They share AdamW with
warm-up and cosine decay and the NaN policy (:class:`StageModule`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

from ..clip import CLIPScorer
from ..config import Config, TrainConfig
from ..data.colours import random_hue
from ..images import save_grid
from ..transformer import DALLE, StreamShape
from ..vae import DiscreteVAE, codebook_usage, psnr
from .resilience import check_loss
from .sharding import build_dalle, reshard


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak at ``max_steps``."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def fused_adamw(train: TrainConfig, params: list[torch.Tensor]) -> bool:
    """Whether AdamW runs as torch's fused kernel: one pass over every parameter instead
    of a loop of element-wise operations per tensor (5.8 M parameters on 2 CPU cores: 8
    against 37 ms a step, docs/benchmarks.md; the same update to rounding). Not under
    ``16-mixed``, whose loss scaling Lightning leaves to the optimizer then and cannot
    clip after; not for the sharded parameters of ``strategy: fsdp``; and only where
    torch has the kernel (CPU and CUDA)."""
    on_devices = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return train.precision != "16-mixed" and train.strategy != "fsdp" and on_devices


class StageModule(L.LightningModule):
    """What every stage shares: AdamW with warm-up + cosine schedule, stepped per update."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config

    def configure_optimizers(self):
        t = self.config.train
        params = list(self.parameters())
        opt = torch.optim.AdamW(
            params,
            lr=t.lr,
            weight_decay=t.weight_decay,
            betas=(0.9, 0.96),
            fused=fused_adamw(t, params) or None,  # None: torch's default kernel
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """``train.grad_clip``: Lightning's clipping, except for the fused AdamW under bf16
        autocast, which Lightning refuses to clip because under fp16 a fused optimizer
        would be handed loss-scaled gradients. bf16 has no loss scaling (and a fused
        optimizer is never picked under ``16-mixed``), so the gradients are the true ones
        and torch's norm clipping is what Lightning's own would do."""
        norm = gradient_clip_algorithm in (None, "norm")
        if gradient_clip_val and norm and optimizer.defaults.get("fused"):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def log_lr(self) -> None:
        """The learning rate of this step (the warm-up and cosine schedule), as ``lr``."""
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=False)

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        """``train.nan_policy``: a NaN/Inf loss stops the run naming the step, or (``skip``)
        gets no backward pass, so the optimizer step after it changes no weight."""
        loop = self.trainer.fit_loop
        where = (
            f" (epoch {loop.epoch_progress.current.processed}, batch {loop.epoch_loop.batch_idx})"
        )
        if check_loss(loss, self.config.train.nan_policy, self.global_step, where):
            super().backward(loss, *args, **kwargs)


class VAEModule(StageModule):
    def __init__(self, config: Config):
        super().__init__(config)
        self.vae = DiscreteVAE(config.vae)

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """``vae.hue_augment``: turn the hue of that share of the batch by a random angle.

        The tokenizer then learns codes for every colour on every structure, including
        colour × shape pairs the data never shows together (docs/quality.md). Seeded by
        the step, so a resumed run draws the same augmentations.
        """
        share = self.config.vae.hue_augment
        if share <= 0:
            return images
        gen = torch.Generator().manual_seed(self.config.train.seed * 1_000_003 + self.global_step)
        chosen = (torch.rand(len(images), generator=gen) < share).to(images.device)
        turned = random_hue(images, gen)
        return torch.where(chosen[:, None, None, None], turned, images)

    def training_step(self, batch, batch_idx):
        images, _ = batch
        images = self.augment(images)
        loss, logs = self.vae(images, self.global_step)
        self.log_dict(
            {"loss": loss, "recon_loss": logs["recon_loss"], "aux_loss": logs["aux_loss"]},
            prog_bar=True,
        )
        # quantizer scalars (gumbel: tau, beta, kl), training-batch PSNR and code use
        extras = {k: logs[k] for k in ("tau", "beta", "kl") if k in logs}
        extras["batch_psnr"] = psnr(logs["images"], images)
        extras["batch_usage"] = codebook_usage(logs["codes"], self.vae.codebook_size)["usage"]
        self.log_dict(extras)
        self.log_lr()
        every = self.config.train.sample_every
        if every and self.global_step % every == 0 and self.trainer.is_global_zero:
            out = Path(self.config.train.out_dir) / "pictures" / f"recon_{self.global_step:07d}.png"
            save_grid(torch.cat([images[:8], logs["images"][:8]]), out, nrow=min(8, len(images)))
        return loss

    def validation_step(self, batch, batch_idx):
        """Held-out reconstruction of the encoder's argmax codes (as at inference)."""
        images, _ = batch
        recon = self.vae.decode(self.vae.encode(images))
        mse = torch.nn.functional.mse_loss(recon, images)
        self.log_dict(
            {"val_mse": mse, "val_psnr": psnr(recon, images)},
            batch_size=len(images),
            sync_dist=True,
        )


class DALLEModule(StageModule):
    """Stage ``dalle``. The transformer is built in :meth:`configure_model`, when Lightning
    knows the device and (``train.strategy: fsdp``) the device mesh to shard it over."""

    def __init__(self, config: Config, shape: StreamShape, null_text: torch.Tensor):
        super().__init__(config)
        self.shape = shape
        self.dalle: DALLE | None = None
        self.register_buffer("null_text", null_text, persistent=False)

    def configure_model(self) -> None:
        if self.dalle is not None:  # Lightning calls the hook again for each trainer entry
            return
        t = self.config.train
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        self.dalle = build_dalle(
            self.config.dalle,
            self.shape,
            self.trainer.strategy.root_device,
            t.seed,
            mesh=mesh,
            precision=t.precision,
            activation_checkpointing=t.activation_checkpointing,
        )

    def on_fit_start(self) -> None:
        # bf16 on a CPU: torch's flash attention kernel runs its backward about 3x slower in
        # bf16 than in float32, which cost more than bf16 saved in the matrix products. The
        # layers' plain attention (q k^T and the weighted sum as bf16 matmuls) is the
        # fastest here: dense layers of short streams (demo model: 1.7x less CPU time per
        # step than float32; PLAIN_DENSE_MAX) and every sparse layer's blocks.
        self._flash = set_flash_attention(self.dalle, not _bf16_on_cpu(self))

    def on_fit_end(self) -> None:
        set_flash_attention(self.dalle, self._flash)

    def training_step(self, batch, batch_idx):
        text, codes = batch
        p = self.config.dalle.p_uncond
        if p > 0:  # caption dropout for classifier-free guidance: the caption becomes all pads
            drop = torch.rand(text.shape[0], device=text.device) < p
            text = torch.where(drop[:, None], self.null_text.expand_as(text), text)
        loss, logs = self.dalle.loss(text, codes)
        self.log_dict({"loss": loss, **logs}, prog_bar=True)
        self.log_lr()
        return loss

    def validation_step(self, batch, batch_idx):
        """Held-out cross-entropy in bits per text token and per image code (section 2.2)."""
        text, codes = batch
        loss, logs = self.dalle.loss(text, codes)
        figures = {
            "val_loss": loss,
            "val_text_bits": logs["text_loss"] / math.log(2),
            "val_image_bits": logs["image_loss"] / math.log(2),
        }
        self.log_dict(figures, batch_size=len(text), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        reshard(self.dalle)  # sharded (train.strategy: fsdp): back to shards after the pass


def _bf16_on_cpu(module: L.LightningModule) -> bool:
    return module.device.type == "cpu" and "bf16" in str(module.trainer.precision)


def set_flash_attention(model: DALLE, enabled: bool) -> bool:
    """Switch the training attention between torch's fused ``scaled_dot_product_attention``
    and plain matrix products with a softmax (dense layers of short streams:
    :func:`dalle1.transformer.dense_attention`; sparse layers' blocks:
    :func:`dalle1.attention.sparse_attention`); returns the previous setting."""
    before, model.flash = model.flash, enabled
    return before


class CLIPModule(StageModule):
    """Stage ``clip``: the contrastive scorer on batches of (images, caption ids)."""

    def __init__(self, config: Config, clip: CLIPScorer):
        super().__init__(config)
        self.clip = clip

    def training_step(self, batch, batch_idx):
        images, text = batch
        loss, logs = self.clip(images, text)
        self.log_dict({"loss": loss, **logs}, prog_bar=True)
        self.log_lr()
        return loss

    def validation_step(self, batch, batch_idx):
        """Held-out InfoNCE loss over each held-out batch."""
        images, text = batch
        loss, _ = self.clip(images, text)
        self.log("val_loss", loss, batch_size=len(images), sync_dist=True)
