"""Manifests: a JSONL or CSV file listing ``file_name`` and ``text`` (Hugging Face's
``imagefolder`` ``metadata.jsonl`` convention)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from ..files import read_text
from .captions import as_caption_lines, caption_source_lines

MANIFEST_SUFFIXES = (".jsonl", ".csv")
MANIFEST_NAMES = ("metadata.jsonl", "metadata.csv")  # Hugging Face imagefolder convention


def read_manifest(path: str | Path) -> list[tuple[Path, list[str]]]:
    """(image, caption lines) rows of a JSONL or CSV manifest with ``file_name`` and ``text``.

    ``file_name`` is resolved against the manifest's folder (the Hugging Face
    ``imagefolder`` ``metadata.jsonl`` convention); ``text`` is a caption, a
    multi-line string or (JSONL) a list of captions. Every image must exist:
    the first missing one is named in a FileNotFoundError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest '{path}' does not exist")
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise ValueError(f"manifest '{path}' must end in .jsonl or .csv")
    rows: list[tuple[int, dict]] = []
    with io.StringIO(read_text(path, "manifest"), newline="") as fh:  # regular file, UTF-8
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
        if not image.exists():
            raise FileNotFoundError(f"{path}:{line}: image '{image}' does not exist")
        if not image.is_file():  # a folder; pipes and devices are skipped when read
            raise ValueError(f"{path}:{line}: image '{image}' is not a file")
        out.append((image, as_caption_lines(row["text"])))
    if not out:
        raise ValueError(f"manifest '{path}' lists no images")
    return out


def write_manifest(pairs: list[tuple[Path, Path | list[str]]], path: str | Path) -> Path:
    """Write (image, captions) pairs as a ``metadata.jsonl`` with paths relative to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for image, captions in pairs:
            rel = os.path.relpath(Path(image).resolve(), path.parent.resolve())
            fh.write(json.dumps({"file_name": rel, "text": caption_source_lines(captions)}) + "\n")
    return path


def manifest_path(path: str | Path) -> Path:
    """A manifest file, or the ``metadata.jsonl`` / ``metadata.csv`` inside a folder."""
    path = Path(path)
    if path.is_dir():
        for name in MANIFEST_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no {' or '.join(MANIFEST_NAMES)} in '{path}'")
    return path
