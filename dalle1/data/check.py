"""``dalle1 data check``: fully decode every image and read every caption, train nothing.

Lists the files training would skip or convert (by the rules of
:mod:`dalle1.images` and :mod:`dalle1.data.captions`), one line each, then totals.
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from ..images import IMAGE_SUFFIXES, BadImageError, probe_image
from .captions import read_caption_file
from .folder import not_a_data_file
from .problems import MAX_CONVERSION_RECORDS, DataProblems


def check_folder(
    root: str | Path, image_size: int | None = None, progress: bool = True
) -> tuple[int, DataProblems]:
    """Fully decode every image and read every caption under ``root``; nothing is trained.

    Returns (number of usable pairs, the problems found).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder '{root}' does not exist")
    problems = DataProblems()
    usable = 0
    files = sorted(p for p in root.rglob("*") if not p.is_dir())  # pipes and devices too
    stems = {p.with_suffix("") for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
    for path in tqdm(files, desc="checking", disable=not progress):
        suffix = path.suffix.lower()
        if suffix == ".txt":
            if path.with_suffix("") not in stems:
                problems.record(path, "caption without an image: ignored", "converted")
            continue
        if suffix not in IMAGE_SUFFIXES:
            continue
        reason = not_a_data_file(path)
        if reason is not None:  # the same rule as training: never opened
            problems.record(path, reason)
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
