"""Bad input data: the conversion rules, the skip-and-count record, and ``dalle1 data check``.

A user's dataset always holds some broken files. The rule of dalle1 is that a
bad file never kills an epoch: every file is either *converted* by a rule
written down here (and in ``docs/reliability.md``) or *skipped and counted*.

Images: the conversion rules and :class:`~dalle1.images.BadImageError` live in
:mod:`dalle1.images`.

Captions (:func:`read_captions`)
    - UTF-8 (a BOM is dropped); UTF-16 files with a BOM are decoded as such;
      other bytes that are not valid UTF-8 are replaced by U+FFFD (converted);
    - a line longer than :data:`MAX_CAPTION_CHARS` characters is cut there
      (the tokenizer truncates further to ``text.text_len`` tokens);
    - blank lines are dropped; an image whose caption file holds no caption,
      or has no same-stem ``.txt`` at all, is skipped.

DALL-E 1 itself (paper section 2.3) filtered its 250M pairs by similar rules
(e.g. dropping images with extreme aspect ratios); the rules above keep every
image that can be read.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .images import IMAGE_SUFFIXES, BadImageError, probe_image

MAX_CAPTION_CHARS = 4096  # characters kept per caption line
MAX_CAPTION_BYTES = 1 << 20  # bytes read from one caption file
EXAMPLES = 5  # offending paths shown per reason
MAX_CONVERSION_RECORDS = 100  # converted files recorded per reason (all skipped files are)


# --- captions ------------------------------------------------------------------------------


def decode_caption_bytes(raw: bytes) -> tuple[str, list[str]]:
    """Caption file bytes -> (text, conversions applied). Never raises."""
    notes = []
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return raw.decode("utf-16", errors="replace"), ["UTF-16 caption decoded"]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        notes.append("caption not valid UTF-8: bad bytes replaced by U+FFFD")
    return text, notes


def caption_lines(text: str) -> tuple[list[str], list[str]]:
    """Text of a caption file -> (non-blank stripped lines, each cut to MAX_CAPTION_CHARS; notes)."""
    lines, notes = [], []
    for line in text.replace("\x00", "").splitlines():
        line = line.strip()
        if len(line) > MAX_CAPTION_CHARS:
            line = line[:MAX_CAPTION_CHARS].rstrip()
            notes.append(f"caption longer than {MAX_CAPTION_CHARS} characters: cut")
        if line:
            lines.append(line)
    return lines, notes


def read_caption_file(path: str | Path) -> tuple[list[str], list[str]]:
    """A caption file -> (caption lines, conversion notes). Unreadable files give no lines."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CAPTION_BYTES + 1)
    except OSError as err:
        return [], [f"caption file unreadable ({err.strerror})"]
    notes = []
    if len(raw) > MAX_CAPTION_BYTES:
        raw = raw[:MAX_CAPTION_BYTES]
        notes.append(f"caption file over {MAX_CAPTION_BYTES} bytes: rest ignored")
    text, decode_notes = decode_caption_bytes(raw)
    lines, line_notes = caption_lines(text)
    return lines, notes + decode_notes + line_notes


# --- the record of problems ----------------------------------------------------------------


@dataclass
class Problem:
    path: str
    reason: str
    action: str = "skipped"  # skipped | converted


class DataProblems:
    """Skipped and converted files, counted; optionally mirrored to a JSON-lines file.

    With ``log_file`` set, every record is appended to it (one ``O_APPEND``
    write per record, so DataLoader worker processes and the main process can
    all write); :meth:`read` then returns what *all* processes recorded. That
    is how training counts files skipped inside ``num_workers > 0`` workers.
    """

    def __init__(self, log_file: str | Path | None = None):
        self.log_file = Path(log_file) if log_file is not None else None
        self.items: list[Problem] = []
        self._seen: set[tuple[str, str]] = set()
        self._converted: Counter[str] = Counter()

    def record(self, path: str | Path, reason: str, action: str = "skipped") -> None:
        item = Problem(str(path), reason, action)
        key = (item.path, item.reason)
        if key in self._seen:  # once per process; other processes may record it again
            return
        if action == "converted":  # conversions are notes: keep examples, not millions of lines
            self._converted[reason] += 1
            if self._converted[reason] > MAX_CONVERSION_RECORDS:
                return
        self._seen.add(key)
        self.items.append(item)
        if self.log_file is not None:
            line = (json.dumps(item.__dict__) + "\n").encode()
            fd = os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def read(self, since: int = 0) -> list[Problem]:
        """All records (from the log file when there is one), from the ``since``-th on."""
        if self.log_file is None:
            return self.items[since:]
        if not self.log_file.exists():
            return []
        items = []
        for line in self.log_file.read_text(errors="replace").splitlines()[since:]:
            try:
                items.append(Problem(**json.loads(line)))
            except (ValueError, TypeError):  # a line cut by a crash
                continue
        return items

    def summary(self, items: list[Problem] | None = None, examples: int = EXAMPLES) -> str:
        """'N files skipped (reason: count, …); first: path (reason), …' and the same for conversions."""
        items = self.read() if items is None else items
        parts = []
        for action in ("skipped", "converted"):
            chosen = {(p.path, p.reason): p for p in items if p.action == action}.values()
            if not chosen:
                continue
            files = {p.path for p in chosen}
            reasons = Counter(p.reason for p in chosen)
            listing = ", ".join(f"{r}: {n}" for r, n in reasons.most_common())
            first = "; ".join(f"{p.path} ({p.reason})" for p in list(chosen)[:examples])
            parts.append(f"{len(files)} files {action} ({listing}); first: {first}")
        return " | ".join(parts)

    def skipped(self) -> list[Problem]:
        return [p for p in self.read() if p.action == "skipped"]


_CURRENT = DataProblems()


def current_problems() -> DataProblems:
    """The record that readers use when none is passed (training points it at its log file)."""
    return _CURRENT


def use_problem_log(log_file: str | Path | None) -> DataProblems:
    """Make a fresh record (mirrored to ``log_file``) the current one; returns it."""
    global _CURRENT
    _CURRENT = DataProblems(log_file)
    return _CURRENT


def pick_caption(options: list[str], index: object = None) -> str:
    """One caption line: drawn from ``index.seed`` when the sampler gave one (reproducible
    across resumes and worker processes, see :class:`dalle1.resilience.ResumableSampler`),
    else from torch's global generator. No lines -> the empty caption."""
    if not options:
        return ""
    seed = getattr(index, "seed", None)
    if seed is not None:
        return options[random.Random(seed).randrange(len(options))]
    return options[int(torch.randint(len(options), ()))]


def scan_pairs(
    pairs: list, captions: list[list[str]], image_size: int | None, problems: DataProblems
) -> tuple[list, list[list[str]]]:
    """Drop pairs whose caption is empty or whose image header cannot be read (recorded)."""
    from tqdm.auto import tqdm

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


# --- the scan before training and `dalle1 data check` -----------------------------------


def orphan_images(root: str | Path, image_suffixes: tuple[str, ...]) -> list[Path]:
    """Images under ``root`` with no same-stem ``.txt`` caption."""
    return [
        p
        for p in sorted(Path(root).rglob("*"))
        if p.suffix.lower() in image_suffixes and not p.with_suffix(".txt").exists()
    ]


def check_folder(
    root: str | Path, image_size: int | None = None, progress: bool = True
) -> tuple[int, DataProblems]:
    """Fully decode every image and read every caption under ``root``; nothing is trained.

    Returns (number of usable pairs, the problems found).
    """
    from tqdm.auto import tqdm

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder '{root}' does not exist")
    problems = DataProblems()
    usable = 0
    files = sorted(p for p in root.rglob("*") if p.is_file())
    stems = {p.with_suffix("") for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
    for path in tqdm(files, desc="checking", disable=not progress):
        suffix = path.suffix.lower()
        if suffix == ".txt":
            if path.with_suffix("") not in stems:
                problems.record(path, "caption without an image: ignored", "converted")
            continue
        if suffix not in IMAGE_SUFFIXES:
            continue
        caption = path.with_suffix(".txt")
        if not caption.exists():
            problems.record(path, "no same-stem .txt caption")
            continue
        try:
            rules = probe_image(path, image_size, decode=True)
        except BadImageError as err:
            problems.record(path, err.reason)
            continue
        lines, notes = read_caption_file(caption)
        for note in notes:
            problems.record(caption, note, "converted")
        if not lines:
            problems.record(path, "empty caption")
            continue
        for rule in rules:
            problems.record(path, rule, "converted")
        usable += 1
    return usable, problems


def format_report(usable: int, problems: DataProblems) -> str:
    """The text `dalle1 data check` prints: one line per problem, then totals."""
    items = problems.read()
    lines = [f"{p.action.upper():9} {p.path}: {p.reason}" for p in items]
    skipped = len({p.path for p in items if p.action == "skipped"})
    converted = len({p.path for p in items if p.action == "converted"})
    more = sum(max(0, n - MAX_CONVERSION_RECORDS) for n in problems._converted.values())
    lines.append(
        f"{usable} usable image/caption pairs; {skipped} files would be skipped, "
        f"{converted + more} converted" + (f" ({more} not listed)" if more else "")
    )
    return "\n".join(lines)


def count_truncated(tokenizer, captions: list[str]) -> int:
    """How many captions take more BPE tokens than the tokenizer's ``text_len`` (cut there)."""
    encodings = tokenizer.tokenizer.encode_batch(list(captions), add_special_tokens=False)
    return sum(len(e.ids) > tokenizer.text_len for e in encodings)
