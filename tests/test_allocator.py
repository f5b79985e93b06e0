"""dalle1.training.allocator: freed memory stays in the process, so reusing it faults no page.

Each check runs in a fresh interpreter: the allocator setting is process-wide and would
otherwise change the memory behaviour of the rest of the suite."""

import os
import subprocess
import sys

import pytest

# Allocate, touch and free a 48 MiB tensor (larger than glibc's largest dynamic mmap
# threshold, so by default it is always a fresh mmap) a few times, then count the page
# faults of doing it four times more. (With the setting, one of the first repetitions
# can still land on fresh memory, depending on where other allocations went; from the
# fourth on, none did in 20 runs.)
SCRIPT = """
import resource, sys, torch
from dalle1.training.allocator import keep_freed_memory
kept = keep_freed_memory()
size = 48 << 20 if kept is None else min(48 << 20, kept // 2)
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(size, dtype=torch.uint8).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(4):
    faults()
print(kept, sum(faults() for _ in range(4)), size // 4096)
"""

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="the setting is glibc's",
)


def run(**env: str) -> tuple[str, int, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env={**clean, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    kept, faults, pages = out.stdout.split()
    return kept, int(faults), int(pages)


@glibc
def test_freed_memory_is_reused_without_page_faults():
    kept, faults, pages = run()
    assert int(kept) >= 32 << 20  # the mmap threshold now in force
    assert faults <= pages // 100  # the later allocations reuse the earlier ones' pages


@glibc
def test_a_malloc_tunable_in_the_environment_is_left_in_charge():
    # glibc told to mmap every block of 128 KiB or more: kept as it is, so the block is
    # fresh memory each time (the memory benchmark relies on this)
    kept, faults, pages = run(MALLOC_MMAP_THRESHOLD_="131072")
    assert kept == "None"
    assert faults >= 2 * pages  # four fresh blocks
