"""Training with Lightning: one LightningModule per stage, one ``fit`` entry point.

DALL-E 1 trains in two stages (paper section 2): first the image tokenizer
(``stage: vae``), then the transformer over [text | image] tokens with the
tokenizer frozen (``stage: dalle``). ``fit(config)`` runs the stage the config
names, writes Lightning checkpoints (for ``--resume``) and logs under
``train.out_dir``, and exports a model folder to ``train.out_dir/model``.

Multi-GPU / multi-node training is Lightning's job: ``train.strategy``,
``train.devices`` and ``train.num_nodes`` go straight to its ``Trainer``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from .checkpoint import export_model, load_vae
from .config import Config
from .data import CaptionedFolder, ensure_dataset, find_pairs, save_grid, split_pairs
from .text import TextTokenizer
from .transformer import DALLE, StreamShape
from .vae import DiscreteVAE, codebook_usage, psnr


def lr_lambda(cfg) -> callable:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak at ``max_steps``."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class StageModule(L.LightningModule):
    """What both stages share: AdamW with warm-up + cosine schedule, stepped per update."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config

    def configure_optimizers(self):
        t = self.config.train
        opt = torch.optim.AdamW(
            self.parameters(), lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.96)
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class VAEModule(StageModule):
    def __init__(self, config: Config):
        super().__init__(config)
        self.vae = DiscreteVAE(config.vae)

    def training_step(self, batch, batch_idx):
        images, _ = batch
        loss, logs = self.vae(images, self.global_step)
        self.log_dict(
            {"loss": loss, "recon_loss": logs["recon_loss"], "aux_loss": logs["aux_loss"]},
            prog_bar=True,
        )
        every = self.config.train.sample_every
        if every and self.global_step % every == 0 and self.trainer.is_global_zero:
            out = Path(self.config.train.out_dir) / "pictures" / f"recon_{self.global_step:07d}.png"
            save_grid(torch.cat([images[:8], logs["images"][:8]]), out, nrow=min(8, len(images)))
        return loss


class DALLEModule(StageModule):
    def __init__(self, config: Config, shape: StreamShape, null_text: torch.Tensor):
        super().__init__(config)
        self.dalle = DALLE(config.dalle, shape)
        self.register_buffer("null_text", null_text, persistent=False)

    def training_step(self, batch, batch_idx):
        text, codes = batch
        p = self.config.dalle.p_uncond
        if p > 0:  # caption dropout for classifier-free guidance: the caption becomes all pads
            drop = torch.rand(text.shape[0], device=text.device) < p
            text = torch.where(drop[:, None], self.null_text.expand_as(text), text)
        loss, logs = self.dalle.loss(text, codes)
        self.log_dict({"loss": loss, **logs}, prog_bar=True)
        return loss


# --- data for the transformer: images encoded once by the frozen VAE ---------------------


class EncodedCaptions(Dataset):
    """(codes, caption) pairs; the caption line is re-drawn every time."""

    def __init__(self, codes: torch.Tensor, captions: list[list[str]]):
        self.codes, self.captions = codes, captions

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        options = self.captions[i] or [""]
        return self.codes[i], options[int(torch.randint(len(options), ()))]


@torch.no_grad()
def encode_dataset(
    vae: DiscreteVAE, dataset: CaptionedFolder, batch_size: int = 64, progress: bool = True
) -> torch.Tensor:
    """Run the frozen VAE over every image once: -> codes (M, grid²)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    from tqdm.auto import tqdm

    return torch.cat(
        [
            vae.encode(images)
            for images, _ in tqdm(loader, desc="encoding images", disable=not progress)
        ]
    )


def text_collate(tokenizer: TextTokenizer, dropout: bool):
    def collate(items):
        codes = torch.stack([c for c, _ in items])
        return tokenizer.encode([t for _, t in items], dropout=dropout), codes

    return collate


# --- the entry point ---------------------------------------------------------------------


def make_trainer(config: Config, out: Path, callbacks: list | None = None) -> L.Trainer:
    t = config.train
    ckpt = ModelCheckpoint(
        dirpath=out / "checkpoints", every_n_train_steps=t.ckpt_every, save_last=True, save_top_k=1
    )
    return L.Trainer(
        default_root_dir=out,
        max_steps=t.max_steps,
        max_epochs=-1,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.grad_clip or None,
        log_every_n_steps=t.log_every,
        logger=CSVLogger(out, name="logs", version=""),
        callbacks=[ckpt, *(callbacks or [])],
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )


def fit(config: Config, resume: bool = False) -> Path:
    """Train the stage ``config.train.stage`` names; returns the exported model folder."""
    t = config.train
    if t.threads:
        torch.set_num_threads(t.threads)
    L.seed_everything(t.seed, workers=True, verbose=False)
    out = Path(t.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_json(out / "config.json")
    ensure_dataset(config.data)
    pairs = find_pairs(config.data.path)
    train_pairs, val_pairs = split_pairs(pairs, config.data.val_fraction, config.data.seed)
    ckpt_path = _resume_path(out) if resume else None
    if t.stage == "vae":
        return _fit_vae(config, out, train_pairs, val_pairs, ckpt_path)
    if t.stage == "dalle":
        return _fit_dalle(config, out, train_pairs, val_pairs, ckpt_path)
    from .rerank import fit_clip  # noqa: PLC0415 (optional stage)

    return fit_clip(config, out, train_pairs, val_pairs, ckpt_path)


def _resume_path(out: Path) -> str:
    last = out / "checkpoints" / "last.ckpt"
    if not last.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at '{last}'")
    return str(last)


def _loader(dataset: Dataset, config: Config, collate=None, shuffle: bool = True) -> DataLoader:
    d = config.data
    return DataLoader(
        dataset,
        batch_size=d.batch_size,
        shuffle=shuffle,
        num_workers=d.num_workers,
        collate_fn=collate,
        drop_last=shuffle and len(dataset) >= d.batch_size,
        persistent_workers=d.num_workers > 0,
    )


def _fit_vae(config: Config, out: Path, train_pairs, val_pairs, ckpt_path) -> Path:
    size = config.vae.image_size
    module = VAEModule(config)
    trainer = make_trainer(config, out)
    trainer.fit(
        module,
        _loader(CaptionedFolder(None, size, train_pairs), config),
        ckpt_path=ckpt_path,
        weights_only=True,
    )
    vae = module.vae.eval()
    if trainer.is_global_zero:
        metrics = evaluate_vae(vae, CaptionedFolder(None, size, val_pairs or train_pairs[:256]))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(json.dumps(metrics))
    return export_model(out / "model", config, vae) if trainer.is_global_zero else out / "model"


@torch.no_grad()
def evaluate_vae(
    vae: DiscreteVAE, dataset: CaptionedFolder, batch_size: int = 64
) -> dict[str, float]:
    """Held-out reconstruction PSNR / MSE and codebook usage."""
    vae.eval()
    originals, recons, codes = [], [], []
    for images, _ in DataLoader(dataset, batch_size=batch_size):
        c = vae.encode(images)
        originals.append(images)
        recons.append(vae.decode(c))
        codes.append(c)
    x, y = torch.cat(originals), torch.cat(recons)
    return {
        "psnr": psnr(y, x),
        "mse": torch.nn.functional.mse_loss(y, x).item(),
        **codebook_usage(torch.cat(codes), vae.codebook_size),
    }


def _fit_dalle(config: Config, out: Path, train_pairs, val_pairs, ckpt_path) -> Path:
    if not config.dalle.vae:
        raise ValueError(
            "dalle.vae must name the model folder of a trained image tokenizer (train stage: vae first)"
        )
    vae = load_vae(config.dalle.vae)
    if vae.cfg.image_size != config.data.image_size:
        raise ValueError(
            f"data.image_size = {config.data.image_size} but the VAE in '{config.dalle.vae}' was trained at {vae.cfg.image_size}"
        )
    train_set = CaptionedFolder(None, vae.cfg.image_size, train_pairs)
    tokenizer = _tokenizer(config, out, train_set.all_captions())
    codes = encode_dataset(vae, train_set, progress=config.train.progress_bar)
    shape = StreamShape(
        tokenizer.vocab_size, tokenizer.text_len, vae.codebook_size, vae.grid_size, tokenizer.bos_id
    )
    module = DALLEModule(config, shape, tokenizer.pad_row())
    data = EncodedCaptions(codes, train_set.captions)
    trainer = make_trainer(config, out)
    trainer.fit(
        module,
        _loader(data, config, text_collate(tokenizer, dropout=True)),
        ckpt_path=ckpt_path,
        weights_only=True,
    )
    dalle = module.dalle.eval()
    if trainer.is_global_zero and val_pairs:
        val = CaptionedFolder(None, vae.cfg.image_size, val_pairs)
        metrics = evaluate_dalle(
            dalle, tokenizer, encode_dataset(vae, val, progress=False), val.captions
        )
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(json.dumps(metrics))
    return (
        export_model(out / "model", config, vae, dalle, tokenizer)
        if trainer.is_global_zero
        else out / "model"
    )


def _tokenizer(config: Config, out: Path, captions: list[str]) -> TextTokenizer:
    """Train the BPE on the training captions once; a resumed run reloads the same one."""
    path = out / "tokenizer.json"
    tx = config.text
    if path.exists():
        return TextTokenizer.load(path, tx.text_len, tx.bpe_dropout)
    tokenizer = TextTokenizer.train(
        captions, tx.vocab_size, tx.text_len, tx.bpe_dropout, tx.lowercase
    )
    tokenizer.save(path)
    return tokenizer


@torch.no_grad()
def evaluate_dalle(
    dalle: DALLE,
    tokenizer: TextTokenizer,
    codes: torch.Tensor,
    captions: list[list[str]],
    batch_size: int = 64,
) -> dict[str, float]:
    """Held-out cross-entropy, in bits per text token and per image token (first caption line)."""
    dalle.eval()
    text_bits = image_bits = 0.0
    for i in range(0, len(codes), batch_size):
        text = tokenizer.encode([(c or [""])[0] for c in captions[i : i + batch_size]])
        _, logs = dalle.loss(text, codes[i : i + batch_size])
        n = len(text)
        text_bits += logs["text_loss"].item() * n / math.log(2)
        image_bits += logs["image_loss"].item() * n / math.log(2)
    return {
        "val_text_bits_per_token": text_bits / len(codes),
        "val_image_bits_per_token": image_bits / len(codes),
    }
