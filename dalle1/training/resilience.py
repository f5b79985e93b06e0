"""Crash safety for training: atomic checkpoints, exact resume, NaN guards, safe loading.

- :class:`AtomicCheckpointIO` writes every Lightning checkpoint to a temporary
  name, fsyncs it, renames it into place and fsyncs the folder: a run killed
  at any instant leaves either the previous ``last.ckpt`` or the new one,
  never half a file. It reads checkpoints only with
  ``torch.load(weights_only=True)``: a pickle that would run code is refused
  (:class:`CheckpointError`) before anything in it executes.
- :class:`ResumableSampler` + :class:`ResumableLoader` make the data order a
  pure function of (seed, epoch, position): the shuffle of epoch ``e`` comes
  from its own generator, each draw carries its own caption seed
  (:class:`SeededIndex`), and the loader tells Lightning how many batches of
  the epoch were consumed, so ``--resume`` continues with exactly the batch
  the killed run would have trained on next.
- :class:`ResumeStateCallback` stores the global RNG states (torch, CUDA,
  Python, NumPy) in every checkpoint and restores them before the first
  resumed step: random draws inside the model (VQ dead-code replacement,
  gumbel noise, dropout, caption dropout) continue as if never interrupted.
- :func:`check_loss` implements ``train.nan_policy``: ``stop`` raises
  :class:`NonFiniteLossError` naming the step; ``skip`` drops that batch's
  update (no gradients, the optimizer leaves every weight as it is).
- :class:`DataReportCallback` prints and logs the files skipped or converted
  (count and first paths) at the end of every epoch and of training.
- :class:`InterruptCheckpoint`: Ctrl-C ends training after the current step with a
  resumable checkpoint (:class:`TrainingInterrupted` tells the command line).
- :class:`HistoryCSVLogger` + :class:`LogHistoryCallback` keep ``logs/metrics.csv``
  across kills and resumes: Lightning's own CSV logger deletes the file when a run
  starts; this one appends, rewrites atomically, carries the row of the batch a
  checkpoint was taken on inside the checkpoint, and on resume drops the rows
  logged after the checkpoint (they are logged again), so every step appears once.
- Before the long work: :func:`prepare_out_dir` (a fresh run refuses an
  ``out_dir`` holding an earlier run unless asked to overwrite it; a resume must
  keep the architecture), :func:`check_trainer_settings` (Lightning's own checks
  of accelerator / devices / strategy / precision, run up front). After it:
  :func:`check_training_result` (a run that trained nothing, or whose weights
  are no longer finite, is an error, and nothing is exported).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import pickle
import random
import shutil
import signal
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from torch.utils.data import DataLoader, Sampler

from ..checkpoint import CLIP_KEYS, DALLE_KEYS, VAE_KEYS
from ..config import Config, ConfigError
from ..data.problems import DataProblems
from ..files import atomic_write, make_writable_folder

log = logging.getLogger("dalle1")


class NonFiniteLossError(ValueError):
    """The training loss became NaN or Inf (``train.nan_policy: stop``)."""


class CheckpointError(ValueError):
    """A checkpoint file is unsafe or unreadable; the message names it."""


class TrainingResultError(ValueError):
    """A run ended without a usable model (nothing trained, NaN/Inf weights); nothing exported."""


# --- checkpoints ---------------------------------------------------------------------------


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with a one-line :class:`CheckpointError` on refusal.

    A file that is not a torch checkpoint at all (not the zip archive ``torch.save``
    writes, e.g. random bytes or a truncated file) is named as such, not as a
    code-execution attempt.
    """
    if Path(path).is_file() and not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head[:1] != b"\x80":  # not a legacy (pre-zip) torch pickle either
            raise CheckpointError(
                f"'{path}' is not a torch checkpoint (not the zip archive torch.save writes; "
                "damaged, truncated or another kind of file)"
            )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines()]
        detail = next((line for line in lines if "Unsupported" in line or "GLOBAL" in line), "")
        raise CheckpointError(
            f"refusing to load '{path}': it pickles objects other than tensors and plain "
            f"containers, which could run code (torch.load(weights_only=True) stopped at: "
            f"{detail[:160] or 'an unsupported pickle opcode'})"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"cannot read checkpoint '{path}' ({err})") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: write-temp-fsync-rename saves, weights-only loads."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        atomic_write(path, lambda fh: torch.save(checkpoint, fh))

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint '{path}' does not exist")
        return safe_torch_load(path, map_location or "cpu")


# --- data order that survives a restart ----------------------------------------------------


class SeededIndex(int):
    """A dataset index that also carries the seed for the random choices of this one draw."""

    seed: int

    def __new__(cls, value: int, seed: int) -> SeededIndex:
        obj = super().__new__(cls, value)
        obj.seed = seed
        return obj

    def __reduce__(self):
        return (SeededIndex, (int(self), self.seed))


class ResumableSampler(Sampler[int]):
    """Shuffles ``size`` indices per pass from (seed, pass number) alone; can start mid-pass.

    Every ``iter()`` is the next pass (epoch). The sampler counts passes itself
    rather than trusting the trainer's epoch number, which Lightning advances
    by one extra when it resumes from a checkpoint taken on an epoch's last
    batch. :class:`ResumableLoader` sets :attr:`next_epoch` and :attr:`skip`
    (samples of that pass already trained on, over all ranks) when a run resumes.

    With ``ranks`` > 1 (DDP, FSDP) the pass is dealt out: rank ``r`` takes positions
    ``r, r + ranks, …`` of the one order, so a step of ``ranks`` batches of ``b`` trains on
    the same samples as one batch of ``ranks × b`` in a single process, and a resumed run
    continues where every rank stopped. (Lightning's own DistributedSampler reshuffles
    the order per rank, which neither a restart nor a single process can follow.)
    """

    def __init__(
        self, size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, ranks: int = 1
    ):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.ranks = rank, ranks
        self.epoch = -1  # the pass in progress
        self.next_epoch = 0
        self.skip = 0

    def order(self, epoch: int) -> list[int]:
        """The index order of ``epoch``."""
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        epoch, skip = self.next_epoch, self.skip
        self.epoch, self.next_epoch, self.skip = epoch, epoch + 1, 0
        order = self.order(epoch)
        base = (self.seed * 1_000_003 + epoch) * (self.size + 1)
        stop = self.size - self.size % self.ranks  # every rank gets as many samples
        start = skip - skip % self.ranks + self.rank
        for position in range(start, stop, self.ranks):
            yield SeededIndex(order[position], base + position)

    def __len__(self) -> int:
        return self.size // self.ranks  # this rank's share of a pass


class ResumableLoader(DataLoader):
    """A DataLoader whose position (epoch, batches consumed) is saved in Lightning checkpoints.

    Lightning calls :meth:`state_dict` when it writes a checkpoint and
    :meth:`load_state_dict` before the resumed run's first ``iter()``.
    """

    progress = None  # set by ResumeStateCallback: () -> batches of this epoch trained on

    def state_dict(self) -> dict[str, int]:
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler) or self.progress is None:
            return {}
        batches = int(self.progress())
        samples = batches * self.batch_size * sampler.ranks  # of the pass, over all ranks
        return {
            "epoch": sampler.epoch,
            "batches": batches,
            "samples": samples,
            "size": sampler.size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        if not state or not isinstance(sampler, ResumableSampler):
            return
        epoch, skip = state["epoch"], state.get("samples", state["batches"] * self.batch_size)
        if state.get("size") != sampler.size:
            log.warning(
                "dataset size changed since the checkpoint (%s -> %s): the resumed epoch restarts",
                state.get("size"),
                sampler.size,
            )
            skip = 0
        share = len(sampler)  # per rank and pass
        usable = (share // self.batch_size) * self.batch_size if self.drop_last else share
        if skip >= usable * sampler.ranks:  # saved on the last batch of a pass: the next pass
            epoch, skip = epoch + 1, 0
        sampler.next_epoch, sampler.skip = epoch, skip


def resumable_loader(
    dataset,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    collate_fn=None,
    rank: int = 0,
    ranks: int = 1,
) -> ResumableLoader:
    """The training loader: reshuffled each epoch from ``seed``, resumable mid-epoch, dealt
    out over ``ranks`` (the trainer is told not to add a DistributedSampler of its own)."""
    sampler = ResumableSampler(len(dataset), seed, rank=rank, ranks=ranks)
    return ResumableLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=len(sampler) >= batch_size,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # worker seeds: keep the global RNG out
    )


# --- RNG state in checkpoints --------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Global RNG states as plain tensors / numbers (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class ResumeStateCallback(L.Callback):
    """Saves RNG states in checkpoints, restores them on resume; wires loader progress."""

    KEY = "dalle1_rng"

    def __init__(self):
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[self.KEY] = rng_state()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._pending = checkpoint.get(self.KEY)

    def on_train_start(self, trainer, pl_module) -> None:
        loaders = trainer.train_dataloader
        for loader in loaders if isinstance(loaders, list | tuple) else [loaders]:
            if isinstance(loader, ResumableLoader):
                loader.progress = lambda: (
                    trainer.fit_loop.epoch_loop.batch_progress.current.processed
                )
        if self._pending is not None:
            set_rng_state(self._pending)
            self._pending = None


# --- NaN / Inf ------------------------------------------------------------------------------

NAN_POLICIES = ("stop", "skip")


def check_loss(loss: torch.Tensor, policy: str, step: int, where: str = "") -> bool:
    """True if ``loss`` is finite. Otherwise ``stop`` raises, ``skip`` warns and returns False."""
    if bool(torch.isfinite(loss.detach()).all()):
        return True
    value = loss.detach().float().flatten()[0].item()
    message = f"training loss is {value} at step {step}{where}" + (
        "; stopped (train.nan_policy=stop). Lower train.lr, raise train.grad_clip, "
        "or set train.nan_policy=skip"
        if policy == "stop"
        else "; this batch is skipped (train.nan_policy=skip)"
    )
    if policy == "stop":
        raise NonFiniteLossError(message)
    log.warning(message)
    print(f"dalle1: warning: {message}", file=sys.stderr)
    return False


# --- reporting bad data ---------------------------------------------------------------------


class DataReportCallback(L.Callback):
    """At every epoch end (and at the end of training): how many files were skipped, which.

    Reads the run's :class:`~dalle1.data.problems.DataProblems` log, which worker
    processes append to as well, prints one line and logs the counts
    (``data_skipped_files``, ``data_converted_files``) to the trainer's logger.
    """

    def __init__(self, problems: DataProblems):
        self.problems = problems
        self.reported = 0
        self.lines: list[str] = []

    def _report(self, trainer, when: str) -> None:
        items = self.problems.read()
        new = items[self.reported :]
        self.reported = len(items)
        if not new or not trainer.is_global_zero:
            return
        line = f"dalle1: data ({when}): {self.problems.summary(new)}"
        self.lines.append(line)
        log.warning(line)
        print(line, file=sys.stderr)
        if trainer.logger is not None:
            skipped = {p.path for p in items if p.action == "skipped"}
            converted = {p.path for p in items if p.action == "converted"}
            trainer.logger.log_metrics(
                {"data_skipped_files": len(skipped), "data_converted_files": len(converted)},
                step=trainer.global_step,
            )

    def on_train_start(self, trainer, pl_module) -> None:
        self._report(trainer, "before training")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, f"epoch {trainer.current_epoch}")

    def on_train_end(self, trainer, pl_module) -> None:
        self._report(trainer, "end of training")


# --- Ctrl-C: stop at the end of the step, save, say how to resume ---------------------------


class TrainingInterrupted(Exception):
    """Ctrl-C stopped training after ``step``; a resumable checkpoint is at ``checkpoint``."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"interrupted at step {step}; saved '{checkpoint}'")
        self.step, self.checkpoint = step, checkpoint


class InterruptCheckpoint(L.Callback):
    """The first Ctrl-C (SIGINT) ends training after the current optimizer step and saves
    ``path`` there, exactly where a periodic checkpoint would be taken, so ``--resume``
    continues as if never stopped. A second Ctrl-C stops at once, saving nothing.

    :attr:`saved_step` is the step saved at (None: not interrupted).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.requested = False
        self.saved_step: int | None = None
        self._previous = None
        self._step_seen = -1

    def _on_sigint(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
        print(
            "\ndalle1: Ctrl-C: stopping after this step and saving a checkpoint "
            "(Ctrl-C again stops at once, saving nothing)",
            file=sys.stderr,
            flush=True,
        )

    def on_fit_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stepped = trainer.global_step != self._step_seen  # this batch ended an optimizer step
        self._step_seen = trainer.global_step
        if self.requested and stepped and self.saved_step is None:
            trainer.save_checkpoint(self.path)
            self.saved_step = trainer.global_step
            trainer.should_stop = True

    def _restore(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()


# --- the log history across kills and resumes ----------------------------------------------


def _step_of(row: dict) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None  # a line cut short by a kill


def _write_rows(path: Path, fieldnames: list[str], rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda fh: fh.write(buffer.getvalue().encode("utf-8")))


def read_history(path: str | Path) -> tuple[list[str], list[dict]]:
    """(header, rows) of a metrics.csv; rows cut short by a kill (no valid step) are dropped."""
    path = Path(path)
    if not path.is_file():
        return [], []
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.DictReader(fh)
        rows = [r for r in reader if _step_of(r) is not None]
        return list(reader.fieldnames or []), rows


def trim_history(path: str | Path, last_step: int, pending: dict | None = None) -> int:
    """Keep the rows of ``metrics.csv`` logged at steps <= ``last_step`` (the rows after
    it will be logged again by the resumed run); add ``pending`` (the row of the batch the
    checkpoint was taken on) if the killed run never wrote it. Returns the rows dropped."""
    path = Path(path)
    header, rows = read_history(path)
    if not header:
        return 0
    kept = [r for r in rows if _step_of(r) <= last_step]
    if pending and not any(
        _step_of(r) == pending["step"] and r.get(k) not in (None, "")
        for r in kept
        for k in pending["row"]
    ):
        header = sorted(set(header) | set(pending["row"]) | {"step"})
        kept.append({**pending["row"], "step": pending["step"]})
    _write_rows(path, header, kept)
    return len(rows) - len(kept)


class HistoryWriter(ExperimentWriter):
    """Lightning's CSV experiment writer, but ``metrics.csv`` outlives a run: it is read back
    (its header kept) instead of deleted, and header changes are atomic rewrites."""

    def _check_log_dir_exists(self) -> None:
        header, _ = read_history(self.metrics_file_path)
        self.metrics_keys = sorted(header)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        _, rows = read_history(self.metrics_file_path)
        _write_rows(Path(self.metrics_file_path), fieldnames, rows)


class HistoryCSVLogger(CSVLogger):
    """``CSVLogger`` writing through :class:`HistoryWriter` (one history across resumes)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> HistoryWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self._root_dir, exist_ok=True)
        self._experiment = HistoryWriter(log_dir=self.log_dir)
        return self._experiment


class LogHistoryCallback(L.Callback):
    """Every optimizer step appears exactly once in ``metrics.csv`` across kills and resumes.

    Lightning writes the log row of a batch just *after* the checkpoint taken on that
    batch, so a kill in between would lose it; the row is therefore also stored in the
    checkpoint (``dalle1_log_row``) and put back on resume if missing. Rows logged after
    the checkpoint are dropped on resume, because the resumed run logs those steps again.
    Also records the step training started at (:func:`check_training_result`).
    """

    KEY = "dalle1_log_row"

    def __init__(self):
        self.start_step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step = trainer.global_step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        loop = trainer.fit_loop
        connector = trainer._logger_connector
        try:
            if (
                not trainer.training
                or loop._should_accumulate()
                or not connector.should_update_logs
            ):
                return
            metrics = connector.metrics["log"]
        except (AttributeError, AssertionError, NotImplementedError, RuntimeError):
            return  # Lightning internals changed: the log simply is not carried
        row = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float | torch.Tensor)}
        if row:
            row.setdefault("epoch", float(trainer.current_epoch))
            checkpoint[self.KEY] = {"step": loop.epoch_loop._batches_that_stepped, "row": row}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        logger = trainer.logger
        if not isinstance(logger, CSVLogger) or not trainer.is_global_zero:
            return
        pending = checkpoint.get(self.KEY)
        # a row's step counts the steps before its batch: a checkpoint at global step G
        # covers the rows of steps 0 … G-1
        last = pending["step"] if pending else checkpoint.get("global_step", 0) - 1
        path = Path(logger.log_dir) / "metrics.csv"
        trim_history(path, last, pending)
        if logger._experiment is not None:  # the writer was made before the trim: re-read
            logger._experiment._check_log_dir_exists()


# --- before the long work: the output folder and Lightning's own checks ---------------------

#: what an earlier run leaves in train.out_dir (a fresh run into it would mix old and new)
RUN_FILES = ("checkpoints", "logs/metrics.csv", "tokenizer.json", "metrics.json", "model")
#: deleted by --overwrite (the old model/ is replaced atomically at the end of the new run)
OVERWRITTEN = (
    "checkpoints",
    "logs",
    "pictures",
    "tokenizer.json",
    "metrics.json",
    "data_problems.jsonl",
)
#: the keys that shape the weights of each stage: a resume must not change them
ARCHITECTURE = {
    "vae": [f"vae.{k}" for k in VAE_KEYS] + ["vae.fsq_levels"],
    "dalle": [f"dalle.{k}" for k in DALLE_KEYS] + ["text.vocab_size", "text.text_len", "dalle.vae"],
    "clip": [f"clip.{k}" for k in CLIP_KEYS] + ["clip.model", "clip.image_size"],
}


def _config_value(values: dict, key: str) -> Any:
    section, name = key.split(".")
    return (values.get(section) or {}).get(name)


def is_primary_process() -> bool:
    """False in the other processes of a multi-process run (Lightning's launcher, torchrun and
    SLURM set these variables), which must not judge or clear the folder rank 0 writes."""
    ranks = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return all((os.environ.get(k) or "0").strip() in ("0", "") for k in ranks)


def prepare_out_dir(config: Config, resume: bool = False, overwrite: bool = False) -> Path:
    """Check ``train.out_dir`` before anything is read or trained; returns it.

    - it must be (or become) a writable folder;
    - a fresh run into a folder holding an earlier run is refused (stale checkpoints, a
      stale ``tokenizer.json`` …) unless ``overwrite``, which deletes that run's files
      (only the primary process judges and clears it: see :func:`is_primary_process`);
    - ``resume`` needs ``checkpoints/last.ckpt`` and the same architecture as the run
      being resumed (from its ``config.json``).
    """
    out = Path(config.train.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.out_dir '{out}' is a file, not a folder")
    try:
        make_writable_folder(out)
    except OSError as err:
        raise ConfigError(
            f"train.out_dir '{out}' is not a writable folder ({err.strerror or err})"
        ) from None
    if resume and overwrite:
        raise ConfigError("--resume continues the run in train.out_dir; --overwrite deletes it")
    if resume:
        last = out / "checkpoints" / "last.ckpt"
        if not last.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at '{last}'")
        check_same_architecture(config, out / "config.json")
        return out
    if not is_primary_process():  # rank 0 checked (and maybe cleared) it and is writing now
        return out
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not overwrite:
        raise ConfigError(
            f"train.out_dir '{out}' holds an earlier run ({', '.join(found)}); continue it with "
            "--resume, start over with --overwrite (deletes that run's checkpoints, logs and "
            "tokenizer), or choose another train.out_dir"
        )
    for name in OVERWRITTEN if overwrite else ():
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    return out


def check_same_architecture(config: Config, saved: Path) -> None:
    """ConfigError naming the first key that shapes the weights and differs from ``saved``."""
    if not saved.is_file():
        return
    try:
        old = json.loads(saved.read_text())
    except (ValueError, OSError):
        return  # unreadable: Lightning's own state-dict check still stands
    new = config.to_dict()
    for key in ARCHITECTURE.get(config.train.stage, []):
        a, b = _config_value(new, key), _config_value(old, key)
        if b is not None and a != b:
            raise ConfigError(
                f"--resume: {key} = {a!r} here but {b!r} in the run being resumed ('{saved}'); "
                "resume with the same architecture, or start a new run"
            )


def check_trainer_settings(config: Config, strategy: Any = None) -> None:
    """Let Lightning check accelerator, devices, strategy and precision now, not after the
    data is read and encoded: a throwaway ``Trainer`` is built (nothing runs). ``strategy``:
    the strategy the real trainer gets when it is not the ``train.strategy`` string (a
    fresh instance: a strategy object serves one trainer)."""
    t = config.train
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its "GPU available: …" lines come once, from the real one
    try:
        L.Trainer(
            accelerator=t.accelerator,
            devices=t.devices,
            num_nodes=t.num_nodes,
            strategy=t.strategy if strategy is None else strategy,
            precision=t.precision,
            accumulate_grad_batches=t.accumulate_grad_batches,
            max_steps=t.max_steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    except Exception as err:  # noqa: BLE001 - MisconfigurationException, ValueError, RuntimeError …
        detail = " ".join(str(err).split())[:300] or type(err).__name__
        raise ConfigError(
            f"train.accelerator={t.accelerator!r}, devices={t.devices!r}, strategy={t.strategy!r}, "
            f"precision={t.precision!r}, num_nodes={t.num_nodes}: Lightning refuses them ({detail})"
        ) from None
    finally:
        quiet.setLevel(level)


def check_training_result(trainer: L.Trainer, module: torch.nn.Module, stage: str) -> None:
    """After ``trainer.fit``: TrainingResultError if no optimizer step ran (and the run was
    not already finished) or if a weight or buffer is NaN/Inf. Nothing is exported then."""
    history = next((c for c in trainer.callbacks if isinstance(c, LogHistoryCallback)), None)
    start = history.start_step if history is not None else None
    if start is None:  # training never started (e.g. no batch arrived to start it)
        start = 0 if trainer.global_step == 0 else trainer.global_step - 1
    if trainer.global_step == start and start < trainer.max_steps:
        raise TrainingResultError(
            f"stage {stage} trained nothing (0 optimizer steps from step {start}): no batch of "
            "training data arrived; check data.path and data.val_fraction. Nothing was exported"
        )
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise TrainingResultError(
                f"stage {stage} ended with {bad} NaN/Inf values in '{name}' (the run diverged; "
                "train.nan_policy=skip skips NaN losses, not NaN weights): nothing was exported. "
                "Lower train.lr or raise train.grad_clip"
            )
