"""The record of bad input files: what was skipped, what was converted, and how often.

A user's dataset always holds some broken files. The rule of dalle1 is that a
bad file never kills an epoch: every file is either *converted* by a written
rule (images: :mod:`dalle1.images`; captions: :mod:`dalle1.data.captions`; both
listed in ``docs/reliability.md``) or *skipped and counted* here. Training
points :func:`current_problems` at ``out_dir/data_problems.jsonl`` so that
DataLoader worker processes record into the same log.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

EXAMPLES = 5  # offending paths shown per reason
MAX_CONVERSION_RECORDS = 100  # converted files recorded per reason (all skipped files are)


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
