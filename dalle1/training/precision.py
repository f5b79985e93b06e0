"""``train.precision: auto``: bf16 autocast where it trains faster, float32 elsewhere.

The paper trains in 16-bit (section 2.4). Lightning's ``bf16-mixed`` keeps float32
weights and runs the matrix products in bfloat16, which needs no loss scaling. Whether
that is faster depends on the device and the model, so ``auto`` (the default) decides
per run, and any explicit value (``32-true``, ``bf16-mixed``, ``16-mixed``) is kept:

* **A CUDA GPU** with bfloat16 (Ampere and later): ``bf16-mixed`` for every stage.
* **A CPU** with native bfloat16 matrix instructions (AMX or AVX512-BF16): ``bf16-mixed``
  for the transformer from width :data:`CPU_BF16_MIN_DIM` on (2 cores, one step:
  ``configs/emoji_dalle_cpu.yaml`` 301 -> 164 ms; the demo's 1.7x less CPU). A
  narrower transformer spends more on the casts than bf16 saves
  (``configs/tiny_dalle.yaml``: 4.7 -> 7.5 ms), and the dVAE's and the scorer's
  convolutions run about three times slower under bf16 autocast on a CPU
  (docs/benchmarks.md, "The demo's training"): they stay float32.
* Anything else: ``32-true``.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import Config

AUTO = "auto"
CPU_BF16_MIN_DIM = 128  # narrowest transformer that trains faster under bf16 on a CPU


def choose_precision(precision: str, stage: str, dim: int, device: str, native_bf16: bool) -> str:
    """``precision`` with ``auto`` resolved (see the module docstring); ``device`` is
    ``cuda``, ``cpu`` or another torch device type, ``native_bf16`` whether it multiplies
    bfloat16 natively."""
    if precision != AUTO:
        return precision
    if not native_bf16:
        return "32-true"
    if device == "cuda":
        return "bf16-mixed"
    if device == "cpu" and stage == "dalle" and dim >= CPU_BF16_MIN_DIM:
        return "bf16-mixed"
    return "32-true"


def training_device(accelerator: str) -> str:
    """The torch device type Lightning's ``accelerator`` setting trains on."""
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return accelerator


def native_bf16(device: str) -> bool:
    """Whether ``device`` has bfloat16 matrix arithmetic in hardware."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device == "cpu":
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return False


def resolve_precision(config: Config) -> Config:
    """``config`` with ``train.precision: auto`` replaced by the precision this machine
    trains the stage in (unchanged for any other value)."""
    t = config.train
    device = training_device(t.accelerator)
    chosen = choose_precision(t.precision, t.stage, config.dalle.dim, device, native_bf16(device))
    return replace(config, train=replace(t, precision=chosen))
