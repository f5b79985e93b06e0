"""Captioned image data: the built-in synthetic shapes set and the folder format.

The folder format is what users bring: ``photo.png`` next to ``photo.txt``; the
text file holds one caption per line and one line is picked at random each time
the image is drawn. The built-in set is written in that same format, so the
demo exercises exactly the path a user's data takes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .datacheck import (
    DataProblems,
    current_problems,
    pick_caption,
    read_caption_file,
    scan_pairs,
)
from .files import atomic_write
from .images import IMAGE_SUFFIXES, BadImageError, load_image

# ---------------------------------------------------------------------------
# The built-in synthetic set: coloured shapes with sizes, positions, relations
# ---------------------------------------------------------------------------

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 70, 230),
    "yellow": (240, 210, 20),
    "purple": (150, 40, 190),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.24, "large": 0.42}  # side as a fraction of the image
# 3x3 placements: caption phrase -> centre (x, y) as fractions of the image
PLACES = {
    "at the top left": (0.25, 0.25),
    "at the top": (0.5, 0.25),
    "at the top right": (0.75, 0.25),
    "on the left": (0.25, 0.5),
    "in the center": (0.5, 0.5),
    "on the right": (0.75, 0.5),
    "at the bottom left": (0.25, 0.75),
    "at the bottom": (0.5, 0.75),
    "at the bottom right": (0.75, 0.75),
}
BACKGROUND = (40, 40, 40)


@dataclass
class Shape:
    color: str
    kind: str
    size: str
    center: tuple[float, float]  # fractions of the image

    def describe(self, with_size: bool = True) -> str:
        return f"{self.size + ' ' if with_size else ''}{self.color} {self.kind}"


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, canvas: int) -> None:
    half = SIZES[shape.size] * canvas / 2
    cx, cy = shape.center[0] * canvas, shape.center[1] * canvas
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = COLORS[shape.color]
    if shape.kind == "circle":
        draw.ellipse(box, fill=fill)
    elif shape.kind == "square":
        draw.rectangle(box, fill=fill)
    else:  # triangle pointing up
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)


def render(shapes: list[Shape], image_size: int) -> Image.Image:
    """Draw shapes at 4x resolution and downsample, for smooth edges."""
    canvas = image_size * 4
    img = Image.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for shape in shapes:
        draw_shape(draw, shape, canvas)
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS)


def random_scene(rng: random.Random, max_shapes: int = 1) -> tuple[list[Shape], list[str]]:
    """One scene and its captions (most specific first; every line is true of the image)."""
    colors, kinds = list(COLORS), list(SHAPES)
    if max_shapes < 2 or rng.random() < 0.5:
        size = rng.choice(list(SIZES))
        place = rng.choice(list(PLACES))
        s = Shape(rng.choice(colors), rng.choice(kinds), size, PLACES[place])
        captions = [
            f"a {s.describe()} {place}",
            f"a {s.describe(False)} {place}",
            f"a {s.describe()}",
            f"a {s.describe(False)}",
        ]
        return [s], captions
    # two shapes side by side or one above the other
    a = Shape(rng.choice(colors), rng.choice(kinds), "small", (0.0, 0.0))
    b = Shape(
        rng.choice([c for c in colors if c != a.color]), rng.choice(kinds), "small", (0.0, 0.0)
    )
    if rng.random() < 0.5:
        x = rng.choice((0.3, 0.5, 0.7))
        a.center, b.center = (x, 0.27), (x, 0.73)
        captions = [
            f"a {a.describe(False)} above a {b.describe(False)}",
            f"a {b.describe(False)} below a {a.describe(False)}",
        ]
    else:
        y = rng.choice((0.3, 0.5, 0.7))
        a.center, b.center = (0.27, y), (0.73, y)
        captions = [
            f"a {a.describe(False)} to the left of a {b.describe(False)}",
            f"a {b.describe(False)} to the right of a {a.describe(False)}",
        ]
    return [a, b], captions


def make_shapes_dataset(
    out: str | Path,
    count: int = 4000,
    image_size: int = 32,
    seed: int = 0,
    max_shapes: int = 1,
    progress: bool = True,
) -> Path:
    """Write ``count`` images with same-stem caption files to ``out``; deterministic in ``seed``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in tqdm(range(count), desc="shapes dataset", disable=not progress):
        shapes, captions = random_scene(rng, max_shapes)
        render(shapes, image_size).save(out / f"{i:06d}.png")
        (out / f"{i:06d}.txt").write_text("\n".join(captions) + "\n")
    return out


# ---------------------------------------------------------------------------
# Reading a folder of captioned images
# ---------------------------------------------------------------------------


def read_captions(path: Path, problems: DataProblems | None = None) -> list[str]:
    """Non-blank lines of a caption file (UTF-8; bad bytes replaced, see :mod:`dalle1.datacheck`)."""
    lines, notes = read_caption_file(path)
    for note in notes:
        (problems or current_problems()).record(path, note, "converted")
    return lines


def find_pairs(root: str | Path, problems: DataProblems | None = None) -> list[tuple[Path, Path]]:
    """All (image, caption file) pairs under ``root``, sorted by path.

    Images without a same-stem ``.txt`` are skipped and recorded in ``problems``
    (default: :func:`~dalle1.datacheck.current_problems`).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder '{root}' does not exist")
    pairs = []
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        caption = image.with_suffix(".txt")
        if caption.exists():
            pairs.append((image, caption))
        else:
            (problems or current_problems()).record(image, "no same-stem .txt caption")
    if not pairs:
        raise FileNotFoundError(f"no image with a same-stem .txt caption found under '{root}'")
    return pairs


class CaptionedFolder(Dataset):
    """(image in [0, 1], caption) pairs from a folder; one caption line picked per draw."""

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        pairs: list[tuple[Path, Path]] | None = None,
        problems: DataProblems | None = None,
        scan: bool = True,
    ):
        self.image_size = image_size
        self.problems = problems if problems is not None else current_problems()
        pairs = pairs if pairs is not None else find_pairs(root, self.problems)
        captions = [  # .txt file or manifest lines
            list(c) if isinstance(c, list | tuple) else read_captions(Path(c), self.problems)
            for _, c in pairs
        ]
        if scan:  # header-only check: unreadable files and empty captions are dropped up front
            listed = len(pairs)
            pairs, captions = scan_pairs(pairs, captions, image_size, self.problems)
            if listed and not pairs:
                raise BadImageError(
                    None,
                    f"none of the {listed} listed images can be used: {self.problems.summary()}",
                )
        self.pairs, self.captions = pairs, captions
        self.failed: set[int] = set()  # indices that failed to decode (in this process)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        """Image ``index`` and one of its captions; a file that fails to decode is recorded
        and replaced by the next decodable one (so a bad file never kills an epoch)."""
        n = len(self.pairs)
        for k in range(n):
            j = (int(index) + k) % n
            if j in self.failed:
                continue
            try:
                image = load_image(self.pairs[j][0], self.image_size)
            except BadImageError as err:
                self.failed.add(j)
                self.problems.record(str(self.pairs[j][0]), err.reason)
                continue
            return image, pick_caption(self.captions[j], index)
        raise BadImageError(None, f"none of the {n} images of the dataset can be decoded")

    def all_captions(self) -> list[str]:
        return [c for lines in self.captions for c in lines]


def split_pairs(pairs: list, val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Deterministic train / held-out split of a list of pairs."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(pairs) * val_fraction)) if len(pairs) > 1 else 0
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [pairs[i] for i in train], [pairs[i] for i in val]


def ensure_dataset(cfg) -> Path:
    """Generate the built-in set at ``cfg.path`` if asked to (``synthetic_count > 0``) and missing."""
    path = Path(cfg.path)
    if cfg.synthetic_count > 0 and not any(path.glob("*.txt")):
        make_shapes_dataset(
            path, cfg.synthetic_count, cfg.image_size, cfg.seed, cfg.synthetic_max_shapes
        )
    return path


# ---------------------------------------------------------------------------
# Manifests, WebDataset shards and format selection (``data.format``)
# ---------------------------------------------------------------------------
#
# Every reader below hands its image bytes to load_image / pil_to_tensor, so
# resizing, cropping and the handling of unreadable files are the same for all
# formats. Samples are (image in [0, 1], caption); a sample's caption source is
# a list of lines, one picked at random per draw (as in the folder format).

MANIFEST_SUFFIXES = (".jsonl", ".csv")
MANIFEST_NAMES = ("metadata.jsonl", "metadata.csv")  # Hugging Face imagefolder convention
SHARD_SUFFIX = ".tar"


def caption_lines(text: str | list[str]) -> list[str]:
    """A manifest ``text`` value (one string, possibly multi-line, or a list) -> caption lines."""
    items = text if isinstance(text, list) else [text]
    return [line.strip() for item in items for line in str(item).splitlines() if line.strip()]


def read_manifest(path: str | Path) -> list[tuple[Path, list[str]]]:
    """(image, caption lines) rows of a JSONL or CSV manifest with ``file_name`` and ``text``.

    ``file_name`` is resolved against the manifest's folder (the Hugging Face
    ``imagefolder`` ``metadata.jsonl`` convention); ``text`` is a caption, a
    multi-line string or (JSONL) a list of captions. Every image must exist:
    the first missing one is named in a FileNotFoundError.
    """
    import csv
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest '{path}' does not exist")
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise ValueError(f"manifest '{path}' must end in .jsonl or .csv")
    rows: list[tuple[int, dict]] = []
    with path.open(encoding="utf-8", newline="") as fh:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(fh)
            rows = [(i + 2, row) for i, row in enumerate(reader)]  # line 1 is the header
        else:
            for i, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{i}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{i}: expected a JSON object per line")
                rows.append((i, row))
    out = []
    for line, row in rows:
        for key in ("file_name", "text"):
            if row.get(key) is None:
                raise ValueError(f"{path}:{line}: missing the '{key}' column")
        image = path.parent / str(row["file_name"])
        if not image.is_file():
            raise FileNotFoundError(f"{path}:{line}: image '{image}' does not exist")
        out.append((image, caption_lines(row["text"])))
    if not out:
        raise ValueError(f"manifest '{path}' lists no images")
    return out


def write_manifest(pairs: list[tuple[Path, Path | list[str]]], path: str | Path) -> Path:
    """Write (image, captions) pairs as a ``metadata.jsonl`` with paths relative to it."""
    import json
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for image, captions in pairs:
            rel = os.path.relpath(Path(image).resolve(), path.parent.resolve())
            fh.write(json.dumps({"file_name": rel, "text": _lines_of(captions)}) + "\n")
    return path


def _lines_of(captions: Path | str | list[str]) -> list[str]:
    return list(captions) if isinstance(captions, list | tuple) else read_captions(Path(captions))


def shard_paths(spec: str | Path) -> list[Path]:
    """Shards named by a folder (every ``*.tar`` in it), one ``.tar``, a glob, or a brace range.

    Brace ranges follow WebDataset: ``data/shard-{000000..000009}.tar``.
    """
    import re

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
        import glob

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


def data_format(cfg) -> str:
    """``cfg.format`` or, for ``auto``, what ``cfg.path`` looks like: folder | manifest | webdataset."""
    if cfg.format != "auto":
        return cfg.format
    text = str(cfg.path)
    path = Path(text)
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        return "manifest"
    if path.suffix.lower() == SHARD_SUFFIX or "{" in text or any(ch in text for ch in "*?["):
        return "webdataset"
    if path.is_dir():
        if any((path / name).is_file() for name in MANIFEST_NAMES):
            return "manifest"
        if any(path.glob(f"*{SHARD_SUFFIX}")) and not any(path.glob("*.txt")):
            return "webdataset"
    return "folder"


def manifest_path(path: str | Path) -> Path:
    """A manifest file, or the ``metadata.jsonl`` / ``metadata.csv`` inside a folder."""
    path = Path(path)
    if path.is_dir():
        for name in MANIFEST_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no {' or '.join(MANIFEST_NAMES)} in '{path}'")
    return path


def load_pairs(cfg) -> list[tuple[Path, Path | list[str]]]:
    """(image, caption source) pairs of a folder or manifest dataset, in a fixed order.

    The caption source is the ``.txt`` file (folder) or the list of lines
    (manifest); :class:`CaptionedFolder` reads either. Shards are streamed
    instead: use :class:`ShardDataset`.
    """
    fmt = data_format(cfg)
    if fmt == "folder":
        return find_pairs(cfg.path)
    if fmt == "manifest":
        return read_manifest(manifest_path(cfg.path))
    raise ValueError(
        f"data.path '{cfg.path}' holds WebDataset shards, which are streamed, not listed"
    )


def iter_tar_samples(path: str | Path):
    """Yield (key, {extension: bytes}) for each sample of a WebDataset tar, in file order.

    WebDataset groups consecutive members sharing a key: the file name up to
    its first dot (``00000012.png`` + ``00000012.txt`` -> key ``00000012``).
    """
    import tarfile

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
    import io
    import tarfile

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
                    text = "\n".join(_lines_of(captions)) + "\n"
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
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def in_val_split(key: str, val_fraction: float) -> bool:
    """Deterministic held-out membership of a streamed sample, by a hash of its key."""
    import zlib

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
                lines = caption_lines(sample.get("txt", b"").decode("utf-8", errors="replace"))
                name = f"{shard}:{key}.{ext}"
                try:
                    image = _decode_bytes(sample[ext], name, self.image_size)
                except BadImageError as err:  # skipped and counted (dalle1.datacheck)
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
    import io

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


def iter_items(cfg, image_size: int, pairs: list | None = None, shard_split: str | None = None):
    """Every (image, caption lines) of a dataset once, in a fixed order (no shuffling).

    ``pairs`` (folder / manifest) or, for shards, the ``cfg.path`` stream
    restricted to ``shard_split`` (None: all). Used to pre-encode images.
    """
    if pairs is not None:
        for image, captions in pairs:
            lines = _lines_of(captions)
            if not lines:  # skipped and counted, like CaptionedFolder does
                current_problems().record(image, "empty caption")
                continue
            try:
                tensor = load_image(image, image_size)
            except BadImageError as err:
                current_problems().record(image, err.reason)
                continue
            yield tensor, lines
        return
    yield from ShardDataset(
        cfg.path,
        image_size,
        split=shard_split,
        val_fraction=cfg.val_fraction,
        split_by_rank=False,
        all_captions=True,
    )
