"""WebDataset tar shards: data beyond one disk, streamed, split across ranks and workers.

A sample is consecutive tar members sharing a key (``00000012.png`` +
``00000012.txt``). Image bytes go through :func:`dalle1.images.load_image`, so
resizing, cropping and the handling of unreadable files are the same as for
files on disk.

Errors follow WebDataset's ``warn_and_continue`` handlers, with a count: a
sample whose image cannot be decoded, or whose caption is empty, is skipped
and recorded (:mod:`dalle1.data.problems`); a shard that is not a tar archive
is skipped and recorded; a shard that ends early (no end-of-archive marker, a
member cut short, or fewer samples than ``shards.json`` lists) keeps the
samples read before the damage and is recorded as truncated. A training stream
in which nothing at all can be used stops with one line instead of spinning.

``dalle1 data shard`` writes the shards and ``shards.json`` (the list of shards
and their sample counts) into a temporary folder and swaps it in for the old
one (:func:`dalle1.files.atomic_folder`): re-sharding never leaves stale shards
from an earlier run, and a reader of a folder with ``shards.json`` reads
exactly the shards it lists.
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
import re
import tarfile
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..files import UnsafeFileError, atomic_folder, open_regular, read_text, regular_file
from ..images import BadImageError, load_image
from .captions import as_caption_lines, caption_source_lines, pick_caption
from .problems import current_problems

SHARD_SUFFIX = ".tar"
SHARD_LIST = "shards.json"  # written by `dalle1 data shard`: the complete set, in order


def read_shard_list(folder: Path) -> list[tuple[Path, int | None]]:
    """(shard, listed sample count) of ``folder/shards.json``; one-line ValueError if malformed."""
    path = folder / SHARD_LIST
    try:
        data = json.loads(read_text(path, "config"))
        entries = [(str(e["name"]), e.get("samples")) for e in data["shards"]]
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise ValueError(
            f"'{path}' is not a shard list written by `dalle1 data shard` ({err})"
        ) from None
    for name, count in entries:
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise ValueError(f"'{path}' names '{name}', not a file in '{folder}'")
        if count is not None and (not isinstance(count, int) or count < 0):
            raise ValueError(f"'{path}': shard '{name}' has a bad sample count {count!r}")
    return [(folder / name, count) for name, count in entries]


def listed_counts(spec: str | Path) -> dict[Path, int]:
    """Sample counts per shard from a folder's ``shards.json`` (empty without one)."""
    folder = Path(str(spec))
    if not (folder.is_dir() and (folder / SHARD_LIST).is_file()):
        return {}
    return {p: n for p, n in read_shard_list(folder) if n is not None}


def shard_paths(spec: str | Path) -> list[Path]:
    """Shards named by a folder (every ``*.tar`` in it), one ``.tar``, a glob, or a brace range.

    Brace ranges follow WebDataset: ``data/shard-{000000..000009}.tar``.
    """
    text = str(spec)
    match = re.search(r"\{(\d+)\.\.(\d+)\}", text)
    if match:
        first, last = match.group(1), match.group(2)
        width = len(first)
        paths = [
            Path(text[: match.start()] + f"{i:0{width}d}" + text[match.end() :])
            for i in range(int(first), int(last) + 1)
        ]
    elif any(ch in text for ch in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(text))]
    elif Path(text).is_dir() and (Path(text) / SHARD_LIST).is_file():
        paths = [p for p, _ in read_shard_list(Path(text))]  # exactly the set `data shard` wrote
    elif Path(text).is_dir():
        paths = sorted(Path(text).glob(f"*{SHARD_SUFFIX}"))
    else:
        paths = [Path(text)]
    for p in paths:
        try:
            regular_file(p, "shard")  # not a pipe or a device: a reader would block on it
        except FileNotFoundError:
            raise FileNotFoundError(f"shard '{p}' does not exist") from None
    if not paths:
        raise FileNotFoundError(f"no {SHARD_SUFFIX} shards found at '{spec}'")
    return paths


COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _ends_cleanly(raw, offset: int) -> bool:
    """An uncompressed tar read to ``offset`` ends there with the end-of-archive zero block."""
    head = os.pread(raw.fileno(), 6, 0)
    if any(head.startswith(magic) for magic in COMPRESSED_MAGIC):
        return True  # offsets are in decompressed bytes: rely on the stream's own checks
    return os.pread(raw.fileno(), 512, offset) == bytes(512)


def iter_tar_samples(path: str | Path, problems=None):
    """Yield (key, {extension: bytes}) for each sample of a WebDataset tar, in file order.

    WebDataset groups consecutive members sharing a key: the file name up to
    its first dot (``00000012.png`` + ``00000012.txt`` -> key ``00000012``).
    A shard that is not a tar archive, or is damaged part-way, is recorded in
    ``problems`` (default: :func:`~dalle1.data.problems.current_problems`) and
    the samples before the damage are still yielded; nothing is raised.
    """
    problems = problems or current_problems()
    key, sample, count = None, {}, 0
    clean = False
    try:
        with open_regular(path, "shard") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:  # streaming read: no random access needed
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                this = f"{folder}/{stem}" if folder else stem
                if this != key:
                    if sample:
                        count += 1
                        yield key, sample
                    key, sample = this, {}
                sample[ext.lower()] = tar.extractfile(member).read()
            clean = _ends_cleanly(raw, tar.offset)
    except (tarfile.TarError, EOFError, OSError, zlib.error, UnsafeFileError) as err:
        if count == 0 and not sample:
            detail = getattr(err, "reason", None) or str(err) or type(err).__name__
            problems.record(path, f"not a readable tar shard ({detail})")
            return
    if not clean:
        problems.record(path, "truncated tar shard (the samples after the damage are lost)")
    if sample:
        yield key, sample


def _image_entry(sample: dict[str, bytes]) -> str | None:
    for ext in ("png", "jpg", "jpeg", "webp", "bmp", "gif"):
        if ext in sample:
            return ext
    return None


def _not_regular(path) -> str | None:
    try:
        regular_file(path, "image")
    except (UnsafeFileError, FileNotFoundError) as err:
        return getattr(err, "reason", "file not found")
    return None


def _check_replaceable(out: Path) -> None:
    """``data shard`` replaces ``out`` as a whole: refuse a folder that holds anything else."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"'{out}' is a file, not a folder for shards")
    if not out.is_dir():
        return
    others = sorted(
        p.name
        for p in out.iterdir()
        if not (p.name == SHARD_LIST or (p.suffix == SHARD_SUFFIX and p.is_file()))
    )
    if others:
        raise ValueError(
            f"'{out}' holds other files than shards (e.g. '{others[0]}'); `data shard` replaces "
            "the whole folder, so give it a new folder or one of earlier shards"
        )


def write_shards(
    pairs: list[tuple[Path, Path | list[str]]],
    out: str | Path,
    shard_size: int = 1000,
    prefix: str = "shard",
    progress: bool = True,
    problems=None,
) -> list[Path]:
    """Pack (image, captions) pairs into WebDataset tars ``out/prefix-000000.tar`` …

    Each sample is ``KEY.<original image suffix>`` (the file's bytes, not
    re-encoded) + ``KEY.txt`` (caption lines); pairs without a caption line are
    skipped and recorded. The shards and ``shards.json`` are written into a
    temporary folder that then replaces ``out`` as a whole
    (:func:`dalle1.files.atomic_folder`): an interrupted run leaves the old set,
    a finished one exactly the new set (no stale shards of an earlier run).
    """
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    if not prefix or "/" in prefix or prefix.startswith("."):
        raise ValueError(f"--prefix must be a plain file name prefix, got {prefix!r}")
    out = Path(out)
    _check_replaceable(out)
    problems = problems if problems is not None else current_problems()
    samples = []
    for image, captions in pairs:
        lines = caption_source_lines(captions)
        reason = "empty caption" if not lines else _not_regular(image)
        if reason is None:
            samples.append((image, lines))
        else:
            problems.record(image, reason)
    bar = tqdm(total=len(samples), desc="writing shards", disable=not progress)
    names, counts = [], []
    with atomic_folder(out) as tmp:
        for k, first in enumerate(range(0, len(samples), shard_size)):
            name = f"{prefix}-{k:06d}{SHARD_SUFFIX}"
            with tarfile.open(tmp / name, mode="w") as tar:
                chunk = samples[first : first + shard_size]
                for i, (image, lines) in enumerate(chunk, start=first):
                    suffix = Path(image).suffix.lower().lstrip(".") or "png"
                    suffix = "jpg" if suffix == "jpeg" else suffix
                    with open_regular(image, "image") as fh:
                        data = fh.read()
                    text = "\n".join(lines) + "\n"
                    for member, payload in (
                        (f"{i:08d}.{suffix}", data),
                        (f"{i:08d}.txt", text.encode("utf-8")),
                    ):
                        info = tarfile.TarInfo(member)
                        info.size, info.mtime, info.mode = len(payload), 0, 0o644
                        tar.addfile(info, io.BytesIO(payload))
                    bar.update()
            names.append(name)
            counts.append(len(chunk))
        listing = {
            "format": "dalle1 webdataset shards",
            "samples": len(samples),
            "shards": [{"name": n, "samples": c} for n, c in zip(names, counts)],
        }
        (tmp / SHARD_LIST).write_text(json.dumps(listing, indent=2) + "\n")
    bar.close()
    return [out / name for name in names]


def rank_and_world() -> tuple[int, int]:
    """This process's global rank and the world size (torch.distributed, else the env)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def in_val_split(key: str, val_fraction: float) -> bool:
    """Deterministic held-out membership of a streamed sample, by a hash of its key."""
    return zlib.crc32(key.encode("utf-8")) % 100_000 < val_fraction * 100_000


class ShardDataset(torch.utils.data.IterableDataset):
    """(image, caption) samples streamed from WebDataset tar shards.

    - ``split``: ``"train"`` / ``"val"`` keep the samples outside / inside the
      held-out share (a hash of each key, so no listing is needed); None keeps all.
    - Split across ranks and DataLoader workers: shard ``i`` goes to reader
      ``i mod (world × workers)``; with fewer shards than readers, every reader
      scans all shards and keeps every n-th sample instead. Readers never overlap.
    - ``repeat``: loop over the shards forever (training; the step count ends it),
      in a new shard order each pass; ``shuffle_buffer`` > 0 mixes samples in a
      buffer of that size. Both are seeded by ``seed`` and the reader.
    - ``all_captions``: yield every caption line (a list) instead of one drawn line.
    """

    def __init__(
        self,
        shards: str | Path | list[Path],
        image_size: int,
        *,
        split: str | None = None,
        val_fraction: float = 0.0,
        repeat: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        split_by_rank: bool = True,
        all_captions: bool = False,
        limit: int | None = None,
    ):
        super().__init__()
        self.shards = shard_paths(shards) if isinstance(shards, str | Path) else list(shards)
        self.counts = listed_counts(shards) if isinstance(shards, str | Path) else {}
        if split not in (None, "train", "val"):
            raise ValueError(f"split must be None, 'train' or 'val', got {split!r}")
        self.image_size, self.split, self.val_fraction = image_size, split, val_fraction
        self.repeat, self.shuffle_buffer, self.seed = repeat, shuffle_buffer, seed
        self.split_by_rank, self.all_captions, self.limit = split_by_rank, all_captions, limit

    def reader(self) -> tuple[int, int]:
        """(this reader's index, number of readers) over ranks × workers."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rank, world = rank_and_world() if self.split_by_rank else (0, 1)
        return rank * workers + worker, world * workers

    def _keep(self, key: str) -> bool:
        if self.split is None or self.val_fraction <= 0:
            return self.split != "val"
        return in_val_split(key, self.val_fraction) == (self.split == "val")

    def _samples(self, shards: list[Path], index: int, every: int, stats: dict):
        """Decoded samples of ``shards``; keeps sample j iff j mod every == index.

        ``stats`` counts ``seen`` (samples in the split, all readers), ``mine`` (given to this
        reader) and ``used`` (yielded).
        """
        j = 0
        for shard in shards:
            read = 0
            for key, sample in iter_tar_samples(shard):
                read += 1
                ext = _image_entry(sample)
                if ext is None or not self._keep(key):
                    continue
                j += 1
                stats["seen"] = j
                if (j - 1) % every != index:
                    continue
                stats["mine"] += 1
                lines = as_caption_lines(sample.get("txt", b"").decode("utf-8", errors="replace"))
                name = f"{shard}:{key}.{ext}"
                if not lines:  # skipped and counted, like an image without a caption on disk
                    current_problems().record(name, "empty caption")
                    continue
                try:
                    image = _decode_bytes(sample[ext], name, self.image_size)
                except BadImageError as err:  # skipped and counted (dalle1.data.problems)
                    current_problems().record(name, err.reason)
                    continue
                stats["used"] += 1
                yield image, lines
            listed = self.counts.get(shard)
            if listed is not None and read < listed:
                current_problems().record(
                    shard, "truncated tar shard (the samples after the damage are lost)"
                )

    def __iter__(self):
        index, readers = self.reader()
        if len(self.shards) >= readers:
            mine, every, within = self.shards[index::readers], 1, 0
        else:
            mine, every, within = self.shards, readers, index
        count, epoch = 0, 0
        while True:
            rng = random.Random(self.seed * 1_000_003 + epoch * 7919 + index)
            order = list(mine)
            if self.shuffle_buffer > 0:
                rng.shuffle(order)
            stats = {"seen": 0, "mine": 0, "used": 0}
            stream = self._samples(order, within, every, stats)
            if self.shuffle_buffer > 0:
                stream = _shuffled(stream, self.shuffle_buffer, rng)
            for image, lines in stream:
                if self.limit is not None and count >= self.limit:
                    return
                count += 1
                if self.all_captions:
                    yield image, lines
                else:
                    yield image, pick_caption(lines)
            epoch += 1
            if self.repeat and (stats["mine"] or not stats["seen"]) and not stats["used"]:
                raise BadImageError(  # an endless stream of empty passes would spin forever
                    None,
                    f"no sample of the {len(mine)} shards can be used "
                    f"({stats['mine']} read): {current_problems().summary() or 'no samples'}",
                )
            if not self.repeat or count == 0:
                return


def _decode_bytes(data: bytes, name: str, image_size: int) -> torch.Tensor:
    """Image bytes -> tensor through load_image (the same decoding as files on disk)."""
    buffer = io.BytesIO(data)
    buffer.name = name  # shown by error messages that name the file
    return load_image(buffer, image_size)


def _shuffled(stream, size: int, rng: random.Random):
    """WebDataset-style buffer shuffle: keep ``size`` items, emit a random one per new item."""
    buffer = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        k = rng.randrange(len(buffer))
        buffer[k], item = item, buffer[k]
        yield item
    rng.shuffle(buffer)
    yield from buffer
