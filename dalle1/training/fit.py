"""``fit(config)``: train the stage the config names and export a model folder.

DALL-E 1 trains in two stages (paper section 2): first the image tokenizer
(``stage: vae``), then the transformer over [text | image] tokens with the
tokenizer frozen (``stage: dalle``); dalle1 adds a third, the reranking scorer
(``stage: clip``), which adds ``clip/`` to a trained model folder. ``fit`` writes
Lightning checkpoints (for ``--resume``) and logs under ``train.out_dir``, the
held-out figures to ``train.out_dir/metrics.json``, and exports the model folder
to ``train.out_dir/model``.

Multi-GPU / multi-node training is Lightning's job: ``train.strategy``,
``train.devices`` and ``train.num_nodes`` go straight to its ``Trainer``, except
``train.strategy: fsdp``, which shards the transformer per layer with FSDP2
(:mod:`dalle1.training.sharding`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from ..checkpoint import (
    ModelFolderError,
    export_model,
    load_parts,
    load_tokenizer,
    load_vae,
    read_json,
    save_clip,
)
from ..clip import CLIPScorer
from ..config import Config, TrainConfig
from ..data import data_format, load_pairs, split_pairs
from ..data.problems import current_problems, use_problem_log
from ..data.sources import ensure_dataset
from ..evaluation import evaluate_dalle, evaluate_vae, retrieval_accuracy
from ..files import atomic_write, recover_folder, remove_stale_temporaries
from ..recommend import Recommended, choose, options_from_dict, save_recommended
from ..text import TextTokenizer, auto_text_len
from ..transformer import StreamShape
from .allocator import keep_freed_memory
from .datamodule import CodesDataModule, ImagesDataModule
from .precision import AUTO, resolve_precision
from .resilience import (
    AtomicCheckpointIO,
    DataReportCallback,
    HistoryCSVLogger,
    InterruptCheckpoint,
    LogHistoryCallback,
    ResumeStateCallback,
    TrainingInterrupted,
    check_trainer_settings,
    check_training_result,
    is_primary_process,
    prepare_out_dir,
)
from .sharding import ShardedDataParallel, gathered_model
from .systems import CLIPModule, DALLEModule, VAEModule
from .throughput import ThroughputCallback
from .watch import SampleGrids, ValidationReport, keep_in_model_folder

# Lightning 2.6 warns about its own use of torch's pytree API on every run; not ours to fix.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# Lightning's info lines (the GPU/TPU banner, a cloud-logging advert, "max_steps reached")
# say nothing a dalle1 run needs; its warnings and errors still show.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
logging.getLogger("lightning.fabric.utilities.rank_zero").setLevel(logging.WARNING)


def fit(
    config: Config, resume: bool = False, callbacks: list | None = None, overwrite: bool = False
) -> Path:
    """Train the stage ``config.train.stage`` names; returns the exported model folder.

    ``data.format`` (or what ``data.path`` looks like) picks the reader: a folder
    or a manifest is listed and split once; WebDataset shards are streamed (the
    VAE stage reads them directly, split across ranks; the transformer stage
    encodes them once, or reads ``data.codes`` from ``dalle1 data encode``).
    ``callbacks`` are extra Lightning callbacks for the trainer.

    Checked before any data is read (:mod:`dalle1.training.resilience`): ``out_dir`` is a
    writable folder, not one holding an earlier run (``resume`` continues that run,
    ``overwrite`` deletes it first), and Lightning accepts the trainer settings. A run that
    trains nothing or ends with NaN/Inf weights raises instead of exporting.
    ``train.precision: auto`` is resolved first (:mod:`dalle1.training.precision`).
    """
    if config.train.precision == AUTO:
        config = resolve_precision(config)
        if is_primary_process():
            print(f"dalle1: train.precision auto -> {config.train.precision}", flush=True)
    t = config.train
    out = prepare_out_dir(config, resume, overwrite)
    check_trainer_settings(config, trainer_strategy(config.train))
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.keep_freed_memory:
        keep_freed_memory()  # no page faults on each step's large tensors
    L.seed_everything(t.seed, workers=True, verbose=False)
    config.save_json(out / "config.json")
    remove_stale_temporaries(out / "checkpoints")  # half-written files of a killed run
    recover_folder(out / "model")  # and a model export it killed mid-swap
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
        if not train_pairs:
            raise ValueError(
                f"data.val_fraction={config.data.val_fraction} holds out all {len(pairs)} "
                f"pairs of '{config.data.path}': nothing is left to train on"
            )
    ckpt_path = _resume_path(out) if resume else None
    if t.stage == "vae":
        return _fit_vae(config, out, train_pairs, val_pairs, ckpt_path, callbacks)
    if t.stage == "dalle":
        return _fit_dalle(config, out, train_pairs, val_pairs, ckpt_path, callbacks)
    if train_pairs is None:
        raise ValueError(f"train.stage {t.stage} reads a folder or a manifest, not shards")
    return fit_clip(config, out, train_pairs, val_pairs, ckpt_path)


def _resume_path(out: Path) -> str:
    last = out / "checkpoints" / "last.ckpt"
    if not last.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at '{last}'")
    return str(last)


def _write_metrics(out: Path, metrics: dict) -> None:
    """``out/metrics.json`` (the held-out figures of the run), also printed as one line."""
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics))


def _train(trainer: L.Trainer, module, data, ckpt_path) -> None:
    """``trainer.fit``; after a Ctrl-C that saved a checkpoint, raise TrainingInterrupted."""
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    for callback in trainer.callbacks:
        if isinstance(callback, InterruptCheckpoint) and callback.saved_step is not None:
            raise TrainingInterrupted(callback.saved_step, callback.path)


def _fit_vae(config: Config, out: Path, train_pairs, val_pairs, ckpt_path, callbacks=None) -> Path:
    module = VAEModule(config)
    trainer = make_trainer(config, out, callbacks)
    data = ImagesDataModule(config, config.vae.image_size, train_pairs, val_pairs)
    _train(trainer, module, data, ckpt_path)
    check_training_result(trainer, module, "vae")
    vae = module.vae.eval()
    if not trainer.is_global_zero:
        return out / "model"
    _write_metrics(out, evaluate_vae(vae, data.val_set))
    folder = export_model(out / "model", config, vae)
    keep_in_model_folder(
        folder, out, "vae", _examples(val_pairs, train_pairs), config.vae.image_size
    )
    return folder


def _examples(val_pairs: list | None, train_pairs: list | None, count: int = 32) -> list:
    """The pairs a model folder keeps as examples: held-out first, topped up from training."""
    held = list(val_pairs or [])
    return held + list(train_pairs or [])[: max(0, count - len(held))]


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
    data = CodesDataModule(config, vae, train_pairs, val_pairs)
    data.setup("fit")  # the codes' captions train the tokenizer, which the model's shape needs
    caption_lines = data.caption_lines()
    tokenizer = _tokenizer(config, out, caption_lines)
    if config.text.text_len != tokenizer.text_len:  # "auto": the model folder records the number
        config = replace(config, text=replace(config.text, text_len=tokenizer.text_len))
    report_truncated(tokenizer, caption_lines)
    data.connect(tokenizer)
    shape = StreamShape(
        tokenizer.vocab_size, tokenizer.text_len, vae.codebook_size, vae.grid_size, tokenizer.bos_id
    )
    module = DALLEModule(config, shape, tokenizer.pad_row())
    held_out = [lines for lines in (data.val_captions or data.train_captions) if lines]
    grids = []
    if config.train.sample_every > 0 and not _sharded(config.train.strategy):
        shown = list(dict.fromkeys(lines[0] for lines in held_out))[:6]
        options = options_from_dict(config.sample.options, "sample.options")
        grids = [
            SampleGrids(out, config.train.sample_every, shown, tokenizer, vae, options=options)
        ]
    throughput = ThroughputCallback(config.train.peak_flops, config.train.log_every)
    trainer = make_trainer(config, out, [throughput, *grids, *(callbacks or [])])
    _train(trainer, module, data, ckpt_path)
    dalle = gathered_model(module.dalle, trainer.global_rank)  # sharded: whole on rank 0 only
    # sharded, the weights are checked once gathered (rank 0); the other ranks check the steps
    whole = module if dalle is module.dalle else dalle
    check_training_result(trainer, whole if whole is not None else torch.nn.Module(), "dalle")
    if dalle is None or not trainer.is_global_zero:
        return out / "model"
    dalle.eval()
    if data.val_codes is not None:
        _write_metrics(out, evaluate_dalle(dalle, tokenizer, data.val_codes, data.val_captions))
    folder = export_model(out / "model", config, vae, dalle, tokenizer)
    examples = _examples(val_pairs, train_pairs)
    keep_in_model_folder(
        folder, out, "dalle", examples, vae.cfg.image_size, inherit=Path(config.dalle.vae)
    )
    recommend_sampling(config, folder, dalle, vae, tokenizer, held_out)
    return folder


def recommend_sampling(
    config: Config,
    folder: Path,
    dalle,
    vae,
    tokenizer: TextTokenizer,
    held_out: list[list[str]],
    clip: CLIPScorer | None = None,
) -> Recommended:
    """Choose the folder's recommended sampling settings (:func:`dalle1.recommend.choose`,
    the ``sample:`` section) on the held-out images' caption lines ``held_out`` (the first
    line of each is a prompt; every line may be a rival), write ``sampling.json``, print them.

    Guidance needs a model trained with caption dropout: without ``dalle.p_uncond`` the
    sweep keeps ``cond_scale`` at 1. Reranking needs a scorer: without clip/ the sweep
    keeps one candidate (the likelihood reranker would judge its own picks).
    """
    s = config.sample
    sweep = dict(s.sweep)
    if config.dalle.p_uncond <= 0 and "cond_scale" in sweep:
        sweep.pop("cond_scale")
    candidates = list(s.candidates) if clip is not None else [1]
    held_out = held_out[:2000]  # the rival pool: enough for near rivals, quick to search
    prompts = list(dict.fromkeys(lines[0] for lines in held_out if lines))[: s.prompts]
    judge = "the clip scorer" if clip is not None else "the transformer's likelihood"
    if len(prompts) < 2 or not sweep:
        why = "fewer than 2 distinct held-out captions" if len(prompts) < 2 else "nothing to sweep"
        chosen = Recommended(options_from_dict(s.options, "sample.options"), note=why)
    else:
        print(
            f"dalle1: choosing sampling settings on {len(prompts)} held-out captions x "
            f"{s.images} images, judged by {judge}:",
            flush=True,
        )
        dalle.eval()
        chosen = choose(
            dalle,
            vae,
            tokenizer,
            prompts,
            clip=clip,
            options=s.options,
            sweep=sweep,
            candidates=candidates,
            images=s.images,
            held_out=held_out,
            seed=s.seed,
            log=lambda line: print(line, flush=True),
        )
    save_recommended(folder, chosen)
    print(f"dalle1: recommended sampling: {chosen.describe()} ({folder / 'sampling.json'})")
    return chosen


def fit_clip(config: Config, out: Path, train_pairs: list, val_pairs: list, ckpt_path) -> Path:
    """Train the scorer on the captioned data and add it as ``clip/`` to ``clip.model``.

    The tokenizer and the text shape come from that model folder, so the scorer reads
    exactly the ids the transformer reads. The folder gains ``clip/`` atomically
    (:func:`dalle1.checkpoint.save_clip`); nothing else in it changes.
    """
    model = Path(config.clip.model) if config.clip.model else None
    if model is None:
        raise ValueError(
            "clip.model must name the model folder to add the scorer to (a trained transformer)"
        )
    if not (model / "tokenizer.json").exists() or not (model / "dalle" / "config.json").exists():
        raise ModelFolderError(
            f"clip.model '{model}' is not a model folder with tokenizer.json and dalle/"
        )
    stream = read_json(model / "dalle" / "config.json", model).get("stream")
    if not isinstance(stream, dict) or not isinstance(stream.get("text_len"), int):
        raise ModelFolderError(
            f"'{model / 'dalle' / 'config.json'}': missing key 'stream.text_len'"
        )
    tokenizer = load_tokenizer(model / "tokenizer.json", stream["text_len"], root=model)
    size = config.clip.image_size or config.data.image_size
    clip = CLIPScorer(
        config.clip, tokenizer.vocab_size, tokenizer.text_len, tokenizer.bpe_vocab_size, size
    )
    module = CLIPModule(config, clip)
    trainer = make_trainer(config, out)
    # held-out pairs for retrieval; with none held out, all training pairs
    data = ImagesDataModule(config, size, train_pairs, val_pairs, tokenizer, val_stand_in=None)
    _train(trainer, module, data, ckpt_path)
    check_training_result(trainer, module, "clip")
    clip = module.clip.eval()
    if not trainer.is_global_zero:
        return model
    held = data.val_set
    captions = [(c or [""])[0] for c in held.captions]
    held_out = [list(c) for c in held.captions if c]
    if len(held) >= 32:
        images = torch.stack([held[i][0] for i in range(len(held))])
        _write_metrics(out, retrieval_accuracy(clip, tokenizer, images, captions))
    save_clip(clip, model)
    keep_in_model_folder(model, out, "clip")
    # the scorer is a better judge and a reranker: choose the sampling settings again with it
    folder_config, vae, dalle, tokenizer = load_parts(model)
    folder_config = replace(folder_config, sample=config.sample)
    recommend_sampling(folder_config, model, dalle, vae, tokenizer, held_out, clip=clip)
    return model


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
    """Train the BPE on the training captions once; a resumed run reloads the same one.

    ``text.text_len: auto`` sizes the text positions from the captions' token counts
    (:func:`dalle1.text.auto_text_len`); a resumed run recomputes the same number from
    the same captions. Prints what the captions take and what was chosen.
    """
    path = out / "tokenizer.json"
    tx = config.text
    fixed = tx.text_len if isinstance(tx.text_len, int) else 1
    if path.exists():
        tokenizer = TextTokenizer.load(path, fixed, tx.bpe_dropout)
    else:
        tokenizer = TextTokenizer.train(
            captions, tx.vocab_size, fixed, tx.bpe_dropout, tx.lowercase
        )
        # the other ranks train the same BPE but leave the file to rank 0: one that runs ahead
        # (rank 0 still exporting a previous run) would make rank 0 see a used out_dir
        if is_primary_process():  # a run killed here never leaves half a tokenizer for --resume
            atomic_write(
                path, lambda fh: fh.write(tokenizer.tokenizer.to_str(pretty=True).encode())
            )
    counts = tokenizer.token_counts(captions)
    if tx.text_len == "auto":
        tokenizer = tokenizer.with_text_len(auto_text_len(counts))
    print(describe_text(tokenizer, counts, tx.vocab_size, tx.text_len == "auto"))
    return tokenizer


def describe_text(
    tokenizer: TextTokenizer, counts: list[int], vocab_cap: int, auto: bool = False
) -> str:
    """One line: how many tokens the captions take, the text slots and the BPE size reached."""
    ordered = sorted(counts) or [0]
    p99 = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
    slots = f"text.text_len={'auto -> ' if auto else ''}{tokenizer.text_len} slots"
    return (
        f"dalle1: text: {len(counts)} caption lines take {ordered[0]}-{ordered[-1]} BPE tokens "
        f"(median {ordered[len(ordered) // 2]}, 99th percentile {p99}); {slots}; "
        f"BPE vocabulary {tokenizer.bpe_vocab_size} tokens learned (text.vocab_size cap {vocab_cap})"
    )


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

    # validation passes print one line each (training.watch.ValidationReport), no bar of their own
    def on_validation_start(self, trainer, pl_module) -> None:
        pass

    def on_validation_batch_start(self, *args, **kwargs) -> None:
        pass

    def on_validation_batch_end(self, *args, **kwargs) -> None:
        pass

    def on_validation_end(self, trainer, pl_module) -> None:
        pass

    def on_train_end(self, trainer, pl_module) -> None:
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
        self.train_progress_bar.close()


def make_trainer(config: Config, out: Path, callbacks: list | None = None) -> L.Trainer:
    t = config.train
    ckpt = ModelCheckpoint(
        dirpath=out / "checkpoints",
        every_n_train_steps=t.ckpt_every,
        # a sharded checkpoint is a folder as large as the training state: write it once and
        # point last.ckpt at it instead of writing it twice
        save_last="link" if _sharded(t.strategy) else True,
        save_top_k=1,
    )
    bar = StepProgressBar(f"training {t.stage}")
    # held-out validation every val_every optimizer steps (Lightning counts batches)
    validate = t.val_every > 0 and t.val_batches > 0
    return L.Trainer(
        default_root_dir=out,
        max_steps=t.max_steps,
        max_epochs=-1,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=trainer_strategy(t),
        precision=t.precision,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.grad_clip or None,
        log_every_n_steps=t.log_every,
        logger=loggers(out, t.log_every),
        callbacks=[
            ckpt,
            ResumeStateCallback(),
            LogHistoryCallback(),
            DataReportCallback(current_problems()),
            InterruptCheckpoint(out / "checkpoints" / "last.ckpt"),
            ValidationReport(out, f"stage {t.stage}"),
            *([bar] if t.progress_bar else []),
            *(callbacks or []),
        ],
        # atomic (temp + fsync + rename) saves, weights-only loads; sharded strategies keep theirs
        plugins=[] if _sharded(t.strategy) else [AtomicCheckpointIO()],
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        limit_val_batches=t.val_batches if validate else 0,
        val_check_interval=t.val_every * t.accumulate_grad_batches if validate else None,
        check_val_every_n_epoch=None if validate else 1,
        use_distributed_sampler=False,  # ResumableSampler deals each pass out over the ranks
        num_sanity_val_steps=0,
    )


def loggers(out: Path, flush_every: int = 1) -> list:
    """``out/logs/metrics.csv`` (one history across resumes; first, so ``trainer.logger``
    is the CSV one; written every ``flush_every`` steps, so a running training can be
    read) and, when the package is installed, the same figures for TensorBoard in
    ``out/tensorboard`` (``tensorboard --logdir out/tensorboard``)."""
    csv = HistoryCSVLogger(
        out, name="logs", version="", flush_logs_every_n_steps=max(1, flush_every)
    )
    found = [csv]
    if importlib.util.find_spec("tensorboard") is not None:
        found.append(
            TensorBoardLogger(out, name="tensorboard", version="", default_hp_metric=False)
        )
    return found


def trainer_strategy(t: TrainConfig):
    """Lightning's strategy for ``train.strategy``: ``fsdp`` is dalle1's FSDP2 set-up
    (:class:`~dalle1.training.sharding.ShardedDataParallel`), anything else Lightning's own."""
    if t.strategy != "fsdp":
        return t.strategy
    if t.stage != "dalle":
        raise ValueError(
            f"train.strategy=fsdp shards the transformer (train.stage dalle); "
            f"train stage {t.stage} with train.strategy=ddp"
        )
    return ShardedDataParallel()


def _sharded(strategy) -> bool:
    return isinstance(strategy, str) and any(k in strategy for k in ("fsdp", "deepspeed"))
