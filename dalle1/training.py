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
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .checkpoint import export_model, load_vae
from .codes import CodesDataset, CodesFile, encode_items
from .config import Config
from .data import (
    CaptionedFolder,
    ShardDataset,
    data_format,
    iter_items,
    load_pairs,
    split_pairs,
)
from .data.captions import pick_caption
from .data.problems import current_problems, use_problem_log
from .data.sources import ensure_dataset
from .files import atomic_write, remove_stale_temporaries
from .images import save_grid
from .resilience import (
    AtomicCheckpointIO,
    DataReportCallback,
    ResumeStateCallback,
    check_loss,
    resumable_loader,
)
from .text import TextTokenizer
from .transformer import DALLE, StreamShape
from .vae import DiscreteVAE, codebook_usage, psnr

# Lightning 2.6 warns about its own use of torch's pytree API on every run; not ours to fix.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


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

    def training_step(self, batch, batch_idx):
        images, _ = batch
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
        return self.codes[int(i)], pick_caption(self.captions[i], i)


@torch.no_grad()
def encode_dataset(
    vae: DiscreteVAE, dataset: CaptionedFolder, batch_size: int = 64, progress: bool = True
) -> torch.Tensor:
    """Run the frozen VAE over every image of a dataset once: -> codes (M, grid²)."""
    items = ((dataset[i][0], []) for i in range(len(dataset)))
    return encode_items(vae, items, batch_size, progress, total=len(dataset))[0]


def text_collate(tokenizer: TextTokenizer, dropout: bool):
    def collate(items):
        codes = torch.stack([c for c, _ in items])
        return tokenizer.encode([t for _, t in items], dropout=dropout), codes

    return collate


# --- the entry point ---------------------------------------------------------------------


class StepProgressBar(TQDMProgressBar):
    """One bar over optimizer steps (``train.max_steps``) instead of one per epoch.

    Runs here are measured in steps, and epochs are open-ended (``max_epochs=-1``),
    so Lightning's per-epoch bar would show "Epoch 8/-2" and restart every epoch.
    """

    def __init__(self, description: str, refresh_rate: int = 5):
        super().__init__(refresh_rate=refresh_rate)
        self.description = description

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.n = trainer.global_step  # a resumed run starts part-way
        self.train_progress_bar.set_description(self.description)

    def on_train_epoch_start(self, trainer, *_) -> None:
        pass  # keep the one bar across epochs

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if trainer.global_step != bar.n and self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass  # the bar closes at the end of training, not of an epoch

    def on_train_end(self, trainer, pl_module) -> None:
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
        self.train_progress_bar.close()


def make_trainer(config: Config, out: Path, callbacks: list | None = None) -> L.Trainer:
    t = config.train
    ckpt = ModelCheckpoint(
        dirpath=out / "checkpoints", every_n_train_steps=t.ckpt_every, save_last=True, save_top_k=1
    )
    bar = StepProgressBar(f"training {t.stage}")
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
        callbacks=[
            ckpt,
            ResumeStateCallback(),
            DataReportCallback(current_problems()),
            *([bar] if t.progress_bar else []),
            *(callbacks or []),
        ],
        # atomic (temp + fsync + rename) saves, weights-only loads; sharded strategies keep theirs
        plugins=[] if _sharded(t.strategy) else [AtomicCheckpointIO()],
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )


def _sharded(strategy) -> bool:
    return isinstance(strategy, str) and any(k in strategy for k in ("fsdp", "deepspeed"))


def fit(config: Config, resume: bool = False, callbacks: list | None = None) -> Path:
    """Train the stage ``config.train.stage`` names; returns the exported model folder.

    ``data.format`` (or what ``data.path`` looks like) picks the reader: a folder
    or a manifest is listed and split once; WebDataset shards are streamed (the
    VAE stage reads them directly, split across ranks; the transformer stage
    encodes them once, or reads ``data.codes`` from ``dalle1 data encode``).
    ``callbacks`` are extra Lightning callbacks for the trainer.
    """
    t = config.train
    if t.threads:
        torch.set_num_threads(t.threads)
    L.seed_everything(t.seed, workers=True, verbose=False)
    out = Path(t.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_json(out / "config.json")
    remove_stale_temporaries(out / "checkpoints")  # half-written files of a killed run
    # files skipped / converted: this run's record, appended to by DataLoader workers too
    (out / "data_problems.jsonl").unlink(missing_ok=True)
    use_problem_log(out / "data_problems.jsonl")
    fmt = data_format(config.data)
    if fmt == "folder":  # the built-in set is written as a folder
        ensure_dataset(config.data)
    train_pairs = val_pairs = None  # stay None for streamed shards and for pre-encoded codes
    if fmt != "webdataset" and not (t.stage == "dalle" and config.data.codes):
        pairs = load_pairs(config.data)
        train_pairs, val_pairs = split_pairs(pairs, config.data.val_fraction, config.data.seed)
    ckpt_path = _resume_path(out) if resume else None
    if t.stage == "vae":
        return _fit_vae(config, out, train_pairs, val_pairs, ckpt_path, callbacks)
    if t.stage == "dalle":
        return _fit_dalle(config, out, train_pairs, val_pairs, ckpt_path, callbacks)
    if train_pairs is None:
        raise ValueError(f"train.stage {t.stage} reads a folder or a manifest, not shards")
    from .rerank import fit_clip  # noqa: PLC0415 (optional stage)

    return fit_clip(config, out, train_pairs, val_pairs, ckpt_path)


def _resume_path(out: Path) -> str:
    last = out / "checkpoints" / "last.ckpt"
    if not last.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at '{last}'")
    return str(last)


def _loader(dataset: Dataset, config: Config, collate=None, shuffle: bool = True) -> DataLoader:
    d = config.data
    shuffle = shuffle and not isinstance(dataset, IterableDataset)  # streams shuffle themselves
    if shuffle:  # order = f(seed, epoch, position): --resume continues with the very next batch
        return resumable_loader(dataset, d.batch_size, config.train.seed, d.num_workers, collate)
    return DataLoader(
        dataset,
        batch_size=d.batch_size,
        shuffle=shuffle,
        num_workers=d.num_workers,
        collate_fn=collate,
        drop_last=shuffle and len(dataset) >= d.batch_size,
        persistent_workers=d.num_workers > 0,
    )


def _image_sets(config: Config, size: int, train_pairs, val_pairs) -> tuple[Dataset, Dataset]:
    """Training images and held-out images: listed pairs, or two filters of the shard stream."""
    if train_pairs is not None:
        return CaptionedFolder(None, size, train_pairs), CaptionedFolder(
            None, size, val_pairs or train_pairs[:256]
        )
    d = config.data
    train = ShardDataset(
        d.path,
        size,
        split="train",
        val_fraction=d.val_fraction,
        repeat=True,
        shuffle_buffer=d.shuffle_buffer,
        seed=d.seed,
    )
    val = ShardDataset(
        d.path, size, split="val", val_fraction=d.val_fraction, split_by_rank=False, limit=1024
    )
    if d.val_fraction <= 0 or next(iter(val), None) is None:  # nothing held out: score train
        val = ShardDataset(
            d.path, size, split="train", val_fraction=d.val_fraction, split_by_rank=False, limit=256
        )
    return train, val


def _fit_vae(config: Config, out: Path, train_pairs, val_pairs, ckpt_path, callbacks=None) -> Path:
    size = config.vae.image_size
    module = VAEModule(config)
    trainer = make_trainer(config, out, callbacks)
    train_set, val_set = _image_sets(config, size, train_pairs, val_pairs)
    trainer.fit(
        module,
        _loader(train_set, config),
        ckpt_path=ckpt_path,
        weights_only=True,
    )
    vae = module.vae.eval()
    if trainer.is_global_zero:
        metrics = evaluate_vae(vae, val_set)
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


def _dalle_codes(config: Config, vae: DiscreteVAE, train_pairs, val_pairs):
    """(train dataset, train captions, held-out codes or None, held-out captions).

    Codes come from ``data.codes`` when set (checked against ``dalle.vae``),
    else from one pass of the frozen VAE over the data (paper section 2.2:
    the transformer is trained on the dVAE's codes; the dVAE stays fixed).
    """
    d, size = config.data, vae.cfg.image_size
    if d.codes:
        store = CodesFile(d.codes)
        store.check_vae(vae, config.dalle.vae)
        train_rows, val_rows = split_pairs(list(range(len(store))), d.val_fraction, d.seed)
        train_captions = [store.captions[i] for i in train_rows]
        val_codes = store.tensor(val_rows) if val_rows else None
        return (
            CodesDataset(store, train_rows),
            train_captions,
            val_codes,
            [store.captions[i] for i in val_rows],
        )
    codes, captions = encode_items(
        vae,
        iter_items(d, size, train_pairs, shard_split="train"),
        progress=config.train.progress_bar,
        total=None if train_pairs is None else len(train_pairs),
    )
    val_codes, val_captions = None, []
    if val_pairs or (train_pairs is None and d.val_fraction > 0):
        items = list(iter_items(d, size, val_pairs, shard_split="val"))
        if items:
            val_codes, val_captions = encode_items(vae, items, progress=False)
    return EncodedCaptions(codes, captions), captions, val_codes, val_captions


def _fit_dalle(
    config: Config, out: Path, train_pairs, val_pairs, ckpt_path, callbacks=None
) -> Path:
    if not config.dalle.vae:
        raise ValueError(
            "dalle.vae must name the model folder of a trained image tokenizer (train stage: vae first)"
        )
    vae = load_vae(config.dalle.vae)
    if vae.cfg.image_size != config.data.image_size:
        raise ValueError(
            f"data.image_size = {config.data.image_size} but the VAE in '{config.dalle.vae}' was trained at {vae.cfg.image_size}"
        )
    data, train_captions, val_codes, val_captions = _dalle_codes(
        config, vae, train_pairs, val_pairs
    )
    caption_lines = [c for lines in train_captions for c in lines]
    tokenizer = _tokenizer(config, out, caption_lines)
    report_truncated(tokenizer, caption_lines)
    shape = StreamShape(
        tokenizer.vocab_size, tokenizer.text_len, vae.codebook_size, vae.grid_size, tokenizer.bos_id
    )
    module = DALLEModule(config, shape, tokenizer.pad_row())
    trainer = make_trainer(config, out, callbacks)
    trainer.fit(
        module,
        _loader(data, config, text_collate(tokenizer, dropout=True)),
        ckpt_path=ckpt_path,
        weights_only=True,
    )
    dalle = module.dalle.eval()
    if trainer.is_global_zero and val_codes is not None:
        metrics = evaluate_dalle(dalle, tokenizer, val_codes, val_captions)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(json.dumps(metrics))
    return (
        export_model(out / "model", config, vae, dalle, tokenizer)
        if trainer.is_global_zero
        else out / "model"
    )


def report_truncated(tokenizer: TextTokenizer, captions: list[str]) -> int:
    """Warn (once per run) how many captions the tokenizer cuts at ``text.text_len`` tokens."""
    n = tokenizer.count_truncated(captions)
    if n:
        print(
            f"dalle1: data: {n} of {len(captions)} caption lines are longer than "
            f"text.text_len={tokenizer.text_len} tokens and are truncated",
            file=sys.stderr,
        )
    return n


def _tokenizer(config: Config, out: Path, captions: list[str]) -> TextTokenizer:
    """Train the BPE on the training captions once; a resumed run reloads the same one."""
    path = out / "tokenizer.json"
    tx = config.text
    if path.exists():
        return TextTokenizer.load(path, tx.text_len, tx.bpe_dropout)
    tokenizer = TextTokenizer.train(
        captions, tx.vocab_size, tx.text_len, tx.bpe_dropout, tx.lowercase
    )
    # a run killed here never leaves half a tokenizer for --resume
    atomic_write(path, lambda fh: fh.write(tokenizer.tokenizer.to_str(pretty=True).encode()))
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
