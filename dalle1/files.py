"""Files that appear complete or not at all: the one atomic write and the one atomic folder.

Everything dalle1 writes that another run may read back goes through here:
Lightning checkpoints, model folders, codes folders, the tokenizer of a run,
WebDataset shards and synthesized images. The recipe is the same for a file
and for a folder: write under a temporary name next to the target, fsync the
data, rename into place (``os.replace`` is atomic on one file system), fsync
the parent folder so that the rename itself survives a power cut. A run
killed at any instant leaves the old file (or folder) or the new one, plus at
worst a temporary that :func:`remove_stale_temporaries` deletes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(file_object)`` on ``.name.tmp-PID``, fsync, rename to ``path``, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete ``.*.tmp-*`` files a killed run left behind in ``folder``; returns them."""
    folder = Path(folder)
    stale = list(folder.glob(".*.tmp-*")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextmanager
def atomic_folder(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``final`` (all of it) when the block succeeds.

    On an exception the temporary folder is deleted and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for root, _, names in os.walk(tmp):
        for name in names:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
