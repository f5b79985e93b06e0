"""Shared set-up for the benchmark scripts: thread settings, the fixed model, memory, timing.

Each script chooses its OpenMP wait policy itself, before its first torch import (the
runtime reads it once); importing this module sets none, so it records what the script
chose (:func:`openmp_env`)."""

from __future__ import annotations

import os
import re
import statistics
import time
from collections.abc import Callable

import torch  # noqa: E402

from dalle1.config import DALLEConfig  # noqa: E402
from dalle1.transformer import DALLE, StreamShape  # noqa: E402

# The fixed benchmark model: small enough for a CPU, the paper's structure otherwise.
MODEL = dict(dim=256, depth=4, heads=4, dim_head=64, ff_mult=4, conv_kernel=11)
TEXT_LEN = 16
IMAGE_VOCAB = 1024
TEXT_VOCAB = 1024 + TEXT_LEN  # BPE tokens + one pad per text position


def openmp_env() -> dict[str, str | None]:
    """The OpenMP wait settings this process started with: they decide how long an idle
    thread spins before it sleeps, which moves wall times (and the dense ÷ sparse ratio
    of training, docs/benchmarks.md) by several percent. ``GOMP_SPINCOUNT`` overrides
    ``OMP_WAIT_POLICY`` when both are set."""
    return {name: os.environ.get(name) for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}


def setup(device: str, threads: int) -> torch.device:
    """Pin CPU threads (2 by default: the shared 2-core machines these figures are for)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if device == "cpu":
        torch.set_num_threads(threads)
    return torch.device(device)


def build_model(grid: int, attention: str, device: torch.device, seed: int = 0) -> DALLE:
    """Random weights: sampling and training cost do not depend on what the weights are."""
    torch.manual_seed(seed)
    shape = StreamShape(
        text_vocab=TEXT_VOCAB, text_len=TEXT_LEN, image_vocab=IMAGE_VOCAB, grid=grid, bos_id=1
    )
    return DALLE(DALLEConfig(attention=attention, **MODEL), shape).to(device)


def model_info(attention: str) -> dict:
    return {
        **MODEL,
        "attention": attention,
        "text_len": TEXT_LEN,
        "image_vocab": IMAGE_VOCAB,
        "text_vocab": TEXT_VOCAB,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on GPU, peak RSS (VmHWM) on CPU.

    On Linux the RSS high-water mark is reset through ``/proc/self/clear_refs`` so each
    block gets its own peak; ``base_mb`` is the RSS when the block started (model,
    libraries), so ``peak_mb - base_mb`` is what the block itself added.
    """

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _status(field: str) -> float:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mb = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.base_mb = self._status("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_mb = self._status("VmHWM")

    def report(self) -> dict:
        kind = "cuda_allocated" if self.device.type == "cuda" else "rss"
        return {
            "memory": kind,
            "base_mb": round(self.base_mb, 1),
            "peak_mb": round(self.peak_mb, 1),
        }


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def median(xs: list[float]) -> float:
    return statistics.median(xs)
