"""Which reader a dataset needs (``data.format``), and the dataset's items in a fixed order.

``data.path`` may be a folder of images with same-stem ``.txt`` captions, a
JSONL/CSV manifest (or a folder holding ``metadata.jsonl``), or WebDataset
shards. Every reader yields (image in [0, 1], caption lines).
"""

from __future__ import annotations

from pathlib import Path

from ..images import BadImageError, load_image
from .captions import caption_source_lines
from .folder import find_pairs
from .manifest import MANIFEST_NAMES, MANIFEST_SUFFIXES, manifest_path, read_manifest
from .problems import current_problems
from .shapes import make_shapes_dataset
from .shards import SHARD_SUFFIX, ShardDataset


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


def load_pairs(cfg, problems=None) -> list[tuple[Path, Path | list[str]]]:
    """(image, caption source) pairs of a folder or manifest dataset, in a fixed order.

    The caption source is the ``.txt`` file (folder) or the list of lines
    (manifest); :class:`~dalle1.data.folder.CaptionedFolder` reads either. Shards are streamed
    instead: use :class:`ShardDataset`.
    """
    fmt = data_format(cfg)
    if fmt == "folder":
        return find_pairs(cfg.path, problems)
    if fmt == "manifest":
        return read_manifest(manifest_path(cfg.path))
    raise ValueError(
        f"data.path '{cfg.path}' holds WebDataset shards, which are streamed, not listed"
    )


def iter_items(cfg, image_size: int, pairs: list | None = None, shard_split: str | None = None):
    """Every (image, caption lines) of a dataset once, in a fixed order (no shuffling).

    ``pairs`` (folder / manifest) or, for shards, the ``cfg.path`` stream
    restricted to ``shard_split`` (None: all). Used to pre-encode images.
    """
    if pairs is not None:
        for image, captions in pairs:
            lines = caption_source_lines(captions)
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


def ensure_dataset(cfg) -> Path:
    """Generate the built-in set at ``cfg.path`` if asked to (``synthetic_count > 0``) and missing."""
    path = Path(cfg.path)
    if cfg.synthetic_count > 0 and not any(path.glob("*.txt")):
        make_shapes_dataset(
            path, cfg.synthetic_count, cfg.image_size, cfg.seed, cfg.synthetic_max_shapes
        )
    return path
