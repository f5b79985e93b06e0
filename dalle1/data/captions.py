"""Caption text: how caption files are decoded and cut into lines, and how a line is drawn.

Rules (converted files are recorded in :mod:`dalle1.data.problems`):

- UTF-8 (a BOM is dropped); UTF-16 files with a BOM are decoded as such;
  other bytes that are not valid UTF-8 are replaced by U+FFFD (converted);
- a line longer than :data:`MAX_CAPTION_CHARS` characters is cut there
  (the tokenizer truncates further to ``text.text_len`` tokens);
- blank lines are dropped; an image whose caption file holds no caption,
  or has no same-stem ``.txt`` at all, is skipped.

Every format gives a sample a list of caption lines (a ``.txt`` file, a
manifest ``text`` value, a shard's ``.txt`` member); one line is drawn each
time the sample is used (:func:`pick_caption`). DALL-E 1 itself (paper section
2.3) filtered its 250M pairs by similar rules (e.g. dropping images with extreme
aspect ratios); the rules here keep every image that can be read.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ..files import UnsafeFileError, open_regular
from .problems import DataProblems, current_problems

MAX_CAPTION_CHARS = 4096  # characters kept per caption line
MAX_CAPTION_BYTES = 1 << 20  # bytes read from one caption file


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


def split_caption_text(text: str) -> tuple[list[str], list[str]]:
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
        with open_regular(path, "caption") as fh:  # never a pipe: it would block forever
            raw = fh.read(MAX_CAPTION_BYTES + 1)
    except FileNotFoundError:
        return [], ["caption file unreadable (No such file or directory)"]
    except UnsafeFileError as err:
        return [], [f"caption file unreadable ({err.reason})"]
    except OSError as err:
        return [], [f"caption file unreadable ({err.strerror})"]
    notes = []
    if len(raw) > MAX_CAPTION_BYTES:
        raw = raw[:MAX_CAPTION_BYTES]
        notes.append(f"caption file over {MAX_CAPTION_BYTES} bytes: rest ignored")
    text, decode_notes = decode_caption_bytes(raw)
    lines, line_notes = split_caption_text(text)
    return lines, notes + decode_notes + line_notes


def read_captions(path: Path, problems: DataProblems | None = None) -> list[str]:
    """Non-blank lines of a caption file (the rules above); conversions are recorded."""
    lines, notes = read_caption_file(path)
    for note in notes:
        (problems or current_problems()).record(path, note, "converted")
    return lines


def as_caption_lines(text: str | list[str]) -> list[str]:
    """A manifest ``text`` value (one string, possibly multi-line, or a list) -> caption lines."""
    items = text if isinstance(text, list) else [text]
    return [line.strip() for item in items for line in str(item).splitlines() if line.strip()]


def caption_source_lines(captions: Path | str | list[str]) -> list[str]:
    """A caption source -> its lines: a list of lines as it is, else the ``.txt`` file it names."""
    return list(captions) if isinstance(captions, list | tuple) else read_captions(Path(captions))


def pick_caption(options: list[str], index: object = None) -> str:
    """One caption line: drawn from ``index.seed`` when the sampler gave one (reproducible
    across resumes and worker processes, see :class:`dalle1.training.resilience.ResumableSampler`),
    else from torch's global generator. No lines -> the empty caption."""
    if not options:
        return ""
    seed = getattr(index, "seed", None)
    if seed is not None:
        return options[random.Random(seed).randrange(len(options))]
    return options[int(torch.randint(len(options), ()))]
