"""Files: the one atomic write, the one atomic folder, and the one safe read.

Writing. Everything dalle1 writes that another run may read back goes through here:
Lightning checkpoints, model folders, codes folders, the tokenizer of a run,
WebDataset shards and synthesized images. The recipe is the same for a file
and for a folder: write under a temporary name next to the target, fsync the
data, rename into place (``os.replace`` is atomic on one file system), fsync
the parent folder so that the rename itself survives a power cut. A run
killed at any instant leaves the old file (or folder) or the new one, plus at
worst a temporary that :func:`remove_stale_temporaries` (files) or
:func:`recover_folder` (folders) deletes. A folder is swapped in with one
``renameat2(RENAME_EXCHANGE)`` where the system has it (Linux), so the target
name never goes missing; elsewhere it takes two renames, and a run killed
between them leaves the old folder under ``.NAME.old-PID``, which
:func:`recover_folder` puts back.

Reading. Every file whose path comes from a user or from a model folder is
read through :func:`read_bytes` / :func:`read_text` (or checked with
:func:`regular_file` when a library opens it): only regular files (a named
pipe would block forever, ``/dev/zero`` never ends), at most
:data:`MAX_BYTES` of each kind of file, and, where a folder is the unit of
trust (a model folder), symlinks are resolved and must stay inside it.
Refusals are one-line :class:`UnsafeFileError` naming the file.

The training log (Lightning's ``metrics.csv``) is read back by :func:`read_csv_log`,
for the loss curves drawn during training and by ``dalle1 explain``.
"""

from __future__ import annotations

import csv
import ctypes
import errno
import os
import re
import shutil
import stat
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


# --- folders ---------------------------------------------------------------------------------

# `.NAME.tmp-PID-RANDOM` (being written), `.NAME.old-PID` (the old folder, mid-swap)
_FOLDER_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)(?:-|$))?")


def make_writable_folder(folder: str | Path) -> None:
    """Create ``folder`` if needed and prove a file can be written in it (OSError if not),
    so a long job refuses a read-only or full output folder before it starts, not after."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, owned by someone else
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # the file system or kernel cannot: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def recover_folder(final: str | Path) -> list[Path]:
    """Clean up after an atomic folder write that was killed; returns what was removed.

    If ``final`` is missing but a killed two-rename swap left the previous folder as
    ``.NAME.old-PID``, that folder is renamed back. Then every ``.NAME.tmp-*`` and
    ``.NAME.old-*`` left by a process that is no longer running is deleted.
    """
    final = Path(final)
    parent = final.parent
    if not parent.is_dir():
        return []
    stale = []
    for entry in sorted(parent.iterdir()):
        match = _FOLDER_TEMP.match(entry.name)
        if not match or match["name"] != final.name or not entry.is_dir():
            continue
        if match["pid"] and _pid_alive(int(match["pid"])):
            continue  # another run is writing it right now
        if match["kind"] == "old" and not final.exists():
            os.replace(entry, final)  # the previous complete folder comes back
            continue
        stale.append(entry)
    for entry in stale:
        shutil.rmtree(entry, ignore_errors=True)
    if stale:
        fsync_dir(parent)
    return stale


@contextmanager
def atomic_folder(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``final`` (all of it) when the block succeeds.

    On an exception the temporary folder is deleted and ``final`` is left as it was.
    At every instant ``final`` is the old folder or the new one (see the module docstring).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for root, _, names in os.walk(tmp):
        for name in names:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
    if not final.exists():
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return
    if _exchange(tmp, final):  # one step: tmp now holds the old folder
        fsync_dir(final.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.replace(final, old)
    os.replace(tmp, final)  # killed between the two: recover_folder puts `old` back
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


# --- safe reading --------------------------------------------------------------------------

MIB = 1 << 20

#: the most bytes read from one file of each kind (None: no cap, but still a regular file)
MAX_BYTES: dict[str, int | None] = {
    "config": 4 * MIB,  # a YAML config, a model part's config.json, meta.json
    "tokenizer": 256 * MIB,  # tokenizer.json
    "list": 64 * MIB,  # --labels / --classes / --prompts / --templates files, captions.jsonl
    "manifest": 4096 * MIB,  # a JSONL / CSV manifest
    "image": 512 * MIB,  # one image file
    "caption": None,  # caption files are read up to their own cap (dalle1.data.captions)
    "weights": None,  # model.safetensors (memory-mapped by safetensors)
    "checkpoint": None,  # a Lightning .ckpt
    "shard": None,  # a WebDataset .tar (streamed)
    "codes": None,  # codes.npy (memory-mapped)
}


class UnsafeFileError(ValueError):
    """A file cannot be read safely (not a regular file, too big, a link out of its folder).

    The message names the file; ``reason`` is the part after its name.
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message

    def __reduce__(self):
        return (type(self), (str(self), self.reason))


def _refuse(kind: str, path: Path, reason: str) -> UnsafeFileError:
    return UnsafeFileError(f"{kind} file '{path}' {reason}", reason)


def _what(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _size(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n} bytes"


def regular_file(path: str | Path, kind: str = "file", root: str | Path | None = None) -> Path:
    """``path`` with its symlinks resolved, checked: a regular file, at most ``MAX_BYTES[kind]``,
    and inside ``root`` (resolved too) when one is given. FileNotFoundError if it is missing,
    :class:`UnsafeFileError` otherwise; both name ``path``."""
    path = Path(path)
    try:
        resolved = path.resolve(strict=True)
        info = resolved.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{kind} file '{path}' does not exist") from None
    except (OSError, RuntimeError) as err:  # a symlink loop, a permission problem
        detail = getattr(err, "strerror", None) or str(err)
        raise _refuse(kind, path, f"cannot be opened ({detail})") from None
    if root is not None:
        top = Path(root).resolve()
        if not resolved.is_relative_to(top):
            raise _refuse(kind, path, f"is a link to '{resolved}', outside the folder '{root}'")
    if not stat.S_ISREG(info.st_mode):
        raise _refuse(kind, path, f"is {_what(info.st_mode)}, not a regular file")
    cap = MAX_BYTES.get(kind)
    if cap is not None and info.st_size > cap:
        raise _refuse(kind, path, f"is {_size(info.st_size)}, over the {_size(cap)} limit")
    return resolved


def open_regular(path: str | Path, kind: str = "file", root: str | Path | None = None) -> IO[bytes]:
    """Open a file checked by :func:`regular_file` for reading, without ever blocking: it is
    opened non-blocking and checked again on the open descriptor (in case it was swapped)."""
    resolved = regular_file(path, kind, root)
    fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    fh = os.fdopen(fd, "rb")
    mode = os.fstat(fh.fileno()).st_mode
    if not stat.S_ISREG(mode):
        fh.close()
        raise _refuse(kind, Path(path), f"is {_what(mode)}, not a regular file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fh.fileno(), True)
    return fh


def read_bytes(path: str | Path, kind: str = "file", root: str | Path | None = None) -> bytes:
    """The bytes of a regular file of at most ``MAX_BYTES[kind]`` (see :func:`regular_file`)."""
    cap = MAX_BYTES.get(kind)
    with open_regular(path, kind, root) as fh:
        data = fh.read() if cap is None else fh.read(cap + 1)
    if cap is not None and len(data) > cap:  # it grew after the check
        raise _refuse(kind, Path(path), f"is over the {_size(cap)} limit")
    return data


def read_text(path: str | Path, kind: str = "file", root: str | Path | None = None) -> str:
    """:func:`read_bytes` decoded as UTF-8 (a BOM is dropped); other bytes name the file."""
    data = read_bytes(path, kind, root)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        reason = f"is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        raise _refuse(kind, Path(path), reason) from None


def read_csv_log(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """A Lightning CSVLogger file -> {column: [(step, value), …]} for every numeric column
    but step / epoch; rows without a step and empty or non-numeric cells are skipped."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                try:
                    series.setdefault(key, []).append((int(float(step)), float(value)))
                except ValueError:
                    continue
    return series
