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
"""

from __future__ import annotations

import logging
import pickle
import random
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch.utils.data import DataLoader, Sampler

from ..data.problems import DataProblems
from ..files import atomic_write

log = logging.getLogger("dalle1")


class NonFiniteLossError(ValueError):
    """The training loss became NaN or Inf (``train.nan_policy: stop``)."""


class CheckpointError(ValueError):
    """A checkpoint file is unsafe or unreadable; the message names it."""


# --- checkpoints ---------------------------------------------------------------------------


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with a one-line :class:`CheckpointError` on refusal."""
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
    (samples of that pass already trained on) when a run resumes.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
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
        for position in range(skip, self.size):
            yield SeededIndex(order[position], base + position)

    def __len__(self) -> int:
        return self.size


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
        return {"epoch": sampler.epoch, "batches": int(self.progress()), "size": sampler.size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        if not state or not isinstance(sampler, ResumableSampler):
            return
        epoch, skip = state["epoch"], state["batches"] * self.batch_size
        if state.get("size") != sampler.size:
            log.warning(
                "dataset size changed since the checkpoint (%s -> %s): the resumed epoch restarts",
                state.get("size"),
                sampler.size,
            )
            skip = 0
        usable = (
            (sampler.size // self.batch_size) * self.batch_size if self.drop_last else sampler.size
        )
        if skip >= usable:  # saved on the last batch of a pass: continue with the next pass
            epoch, skip = epoch + 1, 0
        sampler.next_epoch, sampler.skip = epoch, skip


def resumable_loader(
    dataset, batch_size: int, seed: int, num_workers: int = 0, collate_fn=None
) -> ResumableLoader:
    """The training loader: reshuffled each epoch from ``seed``, resumable mid-epoch."""
    return ResumableLoader(
        dataset,
        batch_size=batch_size,
        sampler=ResumableSampler(len(dataset), seed),
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=len(dataset) >= batch_size,
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
