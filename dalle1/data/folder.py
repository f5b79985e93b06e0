"""The folder format: ``photo.png`` next to ``photo.txt``, one caption per line.

This is what users bring, and the built-in shapes set is written the same way,
so the demo exercises exactly the path a user's data takes. Listing
(:func:`find_pairs`) and a header-only scan (:func:`scan_pairs`) happen once;
:class:`CaptionedFolder` then decodes an image each time it is drawn and picks
one of its caption lines at random.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..files import UnsafeFileError, regular_file
from ..images import IMAGE_SUFFIXES, BadImageError, load_image, probe_image
from .captions import pick_caption, read_captions
from .problems import DataProblems, current_problems


def not_a_data_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as an image file (a named pipe, a device, too big …), or None."""
    if path.is_dir():
        return "a directory"
    try:
        regular_file(path, "image")
    except (UnsafeFileError, FileNotFoundError) as err:  # FileNotFoundError: a dangling link
        return getattr(err, "reason", "file not found")
    return None


def find_pairs(root: str | Path, problems: DataProblems | None = None) -> list[tuple[Path, Path]]:
    """All (image, caption file) pairs under ``root``, sorted by path.

    Images without a same-stem ``.txt`` are skipped and recorded in ``problems``
    (default: :func:`~dalle1.data.problems.current_problems`).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder '{root}' does not exist")
    pairs = []
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        reason = not_a_data_file(image)
        caption = image.with_suffix(".txt")
        if reason is not None:  # a named pipe would block the reader forever
            if reason != "a directory":
                (problems or current_problems()).record(image, reason)
        elif caption.exists():
            pairs.append((image, caption))
        else:
            (problems or current_problems()).record(image, "no same-stem .txt caption")
    if not pairs:
        raise FileNotFoundError(f"no image with a same-stem .txt caption found under '{root}'")
    return pairs


def scan_pairs(
    pairs: list, captions: list[list[str]], image_size: int | None, problems: DataProblems
) -> tuple[list, list[list[str]]]:
    """Drop pairs whose caption is empty or whose image header cannot be read (recorded)."""
    keep_pairs, keep_captions = [], []
    for pair, lines in tqdm(
        list(zip(pairs, captions)), desc="checking images", disable=len(pairs) < 5000
    ):
        image = pair[0]
        if not lines:
            problems.record(image, "empty caption")
            continue
        try:
            rules = probe_image(image, image_size)
        except BadImageError as err:
            problems.record(image, err.reason)
            continue
        for rule in rules:
            problems.record(image, rule, "converted")
        keep_pairs.append(pair)
        keep_captions.append(lines)
    return keep_pairs, keep_captions


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
