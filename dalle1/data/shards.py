"""WebDataset tar shards: data beyond one disk, streamed, split across ranks and workers.

A sample is consecutive tar members sharing a key (``00000012.png`` +
``00000012.txt``). Image bytes go through :func:`dalle1.images.load_image`, so
resizing, cropping and the handling of unreadable files are the same as for
files on disk; unreadable samples are skipped and counted.
"""

from __future__ import annotations

import glob
import io
import os
import random
import re
import tarfile
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..files import atomic_write
from ..images import BadImageError, load_image
from .captions import as_caption_lines, caption_source_lines, pick_caption
from .problems import current_problems

SHARD_SUFFIX = ".tar"


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
    elif Path(text).is_dir():
        paths = sorted(Path(text).glob(f"*{SHARD_SUFFIX}"))
    else:
        paths = [Path(text)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shard '{missing[0]}' does not exist")
    if not paths:
        raise FileNotFoundError(f"no {SHARD_SUFFIX} shards found at '{spec}'")
    return paths


def iter_tar_samples(path: str | Path):
    """Yield (key, {extension: bytes}) for each sample of a WebDataset tar, in file order.

    WebDataset groups consecutive members sharing a key: the file name up to
    its first dot (``00000012.png`` + ``00000012.txt`` -> key ``00000012``).
    """
    key, sample = None, {}
    with tarfile.open(path, "r|*") as tar:  # streaming read: no random access needed
        for member in tar:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot:
                continue
            this = f"{folder}/{stem}" if folder else stem
            if this != key:
                if sample:
                    yield key, sample
                key, sample = this, {}
            sample[ext.lower()] = tar.extractfile(member).read()
    if sample:
        yield key, sample


def _image_entry(sample: dict[str, bytes]) -> str | None:
    for ext in ("png", "jpg", "jpeg", "webp", "bmp", "gif"):
        if ext in sample:
            return ext
    return None


def write_shards(
    pairs: list[tuple[Path, Path | list[str]]],
    out: str | Path,
    shard_size: int = 1000,
    prefix: str = "shard",
    progress: bool = True,
) -> list[Path]:
    """Pack (image, captions) pairs into WebDataset tars ``out/prefix-000000.tar`` …

    Each sample is ``KEY.<original image suffix>`` (the file's bytes, not
    re-encoded) + ``KEY.txt`` (caption lines). Every shard is written with
    :func:`dalle1.files.atomic_write`, so an interrupted run leaves no half shard.
    """
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(pairs), desc="writing shards", disable=not progress)

    def shard(first: int):
        def write(fh) -> None:
            with tarfile.open(fileobj=fh, mode="w") as tar:
                for i in range(first, min(first + shard_size, len(pairs))):
                    image, captions = pairs[i]
                    suffix = Path(image).suffix.lower().lstrip(".") or "png"
                    suffix = "jpg" if suffix == "jpeg" else suffix
                    text = "\n".join(caption_source_lines(captions)) + "\n"
                    for name, data in (
                        (f"{i:08d}.{suffix}", Path(image).read_bytes()),
                        (f"{i:08d}.txt", text.encode("utf-8")),
                    ):
                        info = tarfile.TarInfo(name)
                        info.size, info.mtime, info.mode = len(data), 0, 0o644
                        tar.addfile(info, io.BytesIO(data))
                    bar.update()

        return write

    paths = [
        atomic_write(out / f"{prefix}-{k:06d}{SHARD_SUFFIX}", shard(first))
        for k, first in enumerate(range(0, len(pairs), shard_size))
    ]
    bar.close()
    return paths


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

    def _samples(self, shards: list[Path], index: int, every: int):
        """Decoded samples of ``shards``; keeps sample j iff j mod every == index."""
        j = 0
        for shard in shards:
            for key, sample in iter_tar_samples(shard):
                ext = _image_entry(sample)
                if ext is None or not self._keep(key):
                    continue
                j += 1
                if (j - 1) % every != index:
                    continue
                lines = as_caption_lines(sample.get("txt", b"").decode("utf-8", errors="replace"))
                name = f"{shard}:{key}.{ext}"
                try:
                    image = _decode_bytes(sample[ext], name, self.image_size)
                except BadImageError as err:  # skipped and counted (dalle1.data.problems)
                    current_problems().record(name, err.reason)
                    continue
                yield image, lines

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
            stream = self._samples(order, within, every)
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
