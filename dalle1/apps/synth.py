"""``dalle1 synth``: a labelled ImageFolder dataset sampled from a model, filtered by score.

Resumable: every image has a seed that depends only on (seed, class, index)
(:func:`class_seed`), images and the manifest line are written only when
complete, and a re-run makes only what is missing.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..clip import label_texts
from ..files import atomic_write
from ..pipeline import DALLEPipeline
from ..sampling import SamplingOptions


def class_seed(base: int, name: str, index: int) -> int:
    """A seed that depends only on (base seed, class name, image index): stable across resumes."""
    return base + (zlib.crc32(name.encode()) % 100_000) * 100_000 + index


#: characters of a class name kept in its folder name (file systems allow 255 bytes)
MAX_DIRNAME = 100


def safe_dirname(name: str) -> str:
    """A folder name for a class: unsafe characters become ``_``; a long name is cut and
    given a hash of the full name, so two long names never share a folder."""
    cleaned = "".join(ch if ch.isalnum() or ch in "-_. " else "_" for ch in name).strip()
    if not cleaned or cleaned in (".", ".."):
        raise ValueError(f"class name {name!r} cannot be used as a folder name")
    cleaned = cleaned.replace(" ", "_")
    if len(cleaned.encode("utf-8")) > MAX_DIRNAME:
        cut = cleaned.encode("utf-8")[: MAX_DIRNAME - 9].decode("utf-8", errors="ignore")
        cleaned = f"{cut}-{zlib.crc32(name.encode()):08x}"
    return cleaned


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash: its image is simply made again
    return rows


@torch.no_grad()
def synthesize(
    pipe: DALLEPipeline,
    classes: list[str],
    templates: list[str],
    per_class: int,
    out: str | Path,
    *,
    min_score: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    options: SamplingOptions = SamplingOptions(),
) -> dict[str, Any]:
    """Write an ImageFolder dataset ``out/<class>/NNNNNN.png`` plus ``out/manifest.jsonl``.

    Image ``i`` of class ``c`` uses template ``i mod len(templates)`` and seed
    :func:`class_seed`. Images scoring below ``min_score`` are not written; they are
    logged in ``out/dropped.jsonl`` so that a re-run skips them too. Re-running with the
    same arguments (or a larger ``per_class``) only makes what is missing.
    Scores: the clip cosine if the folder has ``clip/``, else the transformer's mean
    code log-likelihood (nats per code).
    """
    if per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {per_class}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if len(set(classes)) != len(classes):
        raise ValueError("class names repeat")
    texts = label_texts(classes, templates)
    folders = {c: safe_dirname(c) for c in classes}
    if len(set(folders.values())) != len(folders):
        raise ValueError("two class names map to the same folder name")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest, dropped_log = out / "manifest.jsonl", out / "dropped.jsonl"
    done = {(r.get("class"), r.get("index")) for r in _read_jsonl(manifest)}
    done |= {(r.get("class"), r.get("index")) for r in _read_jsonl(dropped_log)}
    todo = [
        (c, i, texts[k][i % len(templates)])
        for k, c in enumerate(classes)
        for i in range(per_class)
        if (c, i) not in done
    ]
    kept = dropped = 0
    bar = tqdm(total=len(todo), desc="synth", disable=not progress)
    with manifest.open("a") as man, dropped_log.open("a") as drop:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            seeds = [class_seed(seed, c, i) for c, i, _ in chunk]
            result = pipe(
                [p for _, _, p in chunk], num_images=1, seeds=seeds, score=True, options=options
            )
            for (c, i, prompt), s, image, score in zip(chunk, seeds, result.images, result.scores):
                row = {"class": c, "index": i, "prompt": prompt, "score": score, "seed": s}
                if min_score is not None and score < min_score:
                    drop.write(json.dumps(row) + "\n")
                    drop.flush()
                    dropped += 1
                    continue
                name = f"{folders[c]}/{i:06d}.png"
                atomic_write(out / name, lambda fh, image=image: image.save(fh, format="PNG"))
                man.write(json.dumps({"file": name, **row}) + "\n")
                man.flush()
                kept += 1
            bar.update(len(chunk))
    bar.close()
    rows = _read_jsonl(manifest)
    per = {c: sum(r.get("class") == c for r in rows) for c in classes}
    return {
        "out": str(out),
        "scorer": "clip" if pipe.clip is not None else "self",
        "made": len(todo),
        "kept": kept,
        "dropped": dropped,
        "skipped_existing": len(classes) * per_class - len(todo),
        "images_per_class": per,
    }
