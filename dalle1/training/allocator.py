"""Keep freed memory in the process during training, so each step does not fault it in again.

A training step allocates and frees the same large tensors every time (the logits, their
float32 copy and its gradient are 16 MB each at 32×32 codes and batch 4). glibc's malloc
serves a block of that size with its own ``mmap`` and returns it to the kernel on
``free``, so the next step's block is fresh memory again: the kernel maps and zeroes it
page by page on first touch. Measured on a 2-core machine (one training step of
``benchmarks/bench_attention.py``'s model, 32×32, batch 4, bf16): about 22,000 page faults
a step, and operations such as the loss's ``fill_`` and ``log_softmax`` on 16 MB taking
30 ms instead of 1–2 ms; the steps ran 11–15% faster with the memory kept (dense 0.647 →
0.569 s, ``attention: dalle`` 0.501 → 0.427 s; docs/benchmarks.md).

:func:`keep_freed_memory` tells glibc (``mallopt``) to serve large blocks from its heap and
to keep freed memory for reuse, as PyTorch's CUDA caching allocator does on a GPU and as
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` would if set before the process
started. The cost: the process holds on to its peak memory instead of shrinking between
steps. It changes nothing where malloc is not glibc's (macOS, Windows, musl) or where the
environment already sets one of glibc's malloc tunables (``MALLOC_*_``, or
``glibc.malloc.*`` in ``GLIBC_TUNABLES``) (then those rule, as the
memory benchmark relies on), and ``train.keep_freed_memory: false`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# Blocks below the mmap threshold come from the heap. Some glibc versions refuse a
# threshold above 32 MiB (half their 64-bit HEAP_MAX_SIZE), so that is the fallback.
THRESHOLDS = (1 << 30, 32 << 20)
# Free memory at the top of the heap beyond this much is returned to the kernel.
TRIM_THRESHOLD = 1 << 30
TUNABLES = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (it has ``gnu_get_libc_version``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_freed_memory() -> int | None:
    """Have glibc keep freed blocks for reuse; -> the mmap threshold set (bytes), or None
    where nothing was changed (not glibc, or a ``MALLOC_*`` tunable in the environment)."""
    if any(name in os.environ for name in TUNABLES) or "glibc.malloc" in os.environ.get(
        "GLIBC_TUNABLES", ""
    ):
        return None
    libc = _glibc()
    if libc is None:
        return None
    for threshold in THRESHOLDS:
        if libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1:
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
            return threshold
    return None
