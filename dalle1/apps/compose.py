"""``dalle1 eval --compose``: does the model draw colour × shape pairs it never saw?

DALL-E's headline claim is composing concepts that never appeared together in training
(paper section 3.2 and the blog's "an armchair in the shape of an avocado"). The
built-in shapes set can hold out colour × shape pairs (``data.synthetic_holdout``);
this module measures, on a model trained on such a set:

* :func:`tokenizer_report` — the image tokenizer's reconstruction of clean renders of
  seen and never-seen pairs (PSNR, and how often the detector still reads the pair);
* :func:`judge_folder` — the same counts for images already drawn (say by
  ``dalle1 sample``), each beside a same-stem ``.txt`` naming its pair;
* :func:`composition_report` — for the prompt "a large <colour> <shape> in the center"
  of every pair, the share of samples the detector (:mod:`dalle1.data.detect`) reads as
  exactly that pair, seen and never-seen apart, at several guidance scales, with and
  without reranking, and how often each failure happens.

The detector is independent of the model and of the clip scorer, so the figures do not
reward a model for fooling its own judge.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import read_json
from ..data.captions import read_captions
from ..data.detect import VERDICTS, judge
from ..data.folder import find_pairs
from ..data.shapes import COLORS, PLACES, SHAPES, Shape, parse_pairs, render
from ..images import load_input, pil_to_tensor
from ..pipeline import DALLEPipeline
from ..sampling import SamplingOptions
from ..vae import DiscreteVAE

TEMPLATE = "a large {color} {shape} in the center"


def model_holdout(folder: str | Path) -> list[str]:
    """``data.synthetic_holdout`` of the config a model folder was trained with ([] if none).

    ``folder`` may be the model folder or its ``vae/`` part."""
    folder = Path(folder)
    for candidate in (folder / "config.json", folder.parent / "config.json"):
        if candidate.is_file():
            data = read_json(candidate, candidate.parent).get("data", {})
            if isinstance(data, dict) and "synthetic_holdout" in data:
                return list(data["synthetic_holdout"])
    return []


def pairs_by_group(holdout: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Every colour × shape pair, split into ``seen`` and ``unseen`` (held out)."""
    held = parse_pairs(holdout)
    every = [(c, s) for c in COLORS for s in SHAPES]
    return {
        "seen": [p for p in every if p not in held],
        "unseen": [p for p in every if p in held],
    }


def _summary(verdicts: list[str]) -> dict:
    counts = Counter(verdicts)
    total = max(1, len(verdicts))
    return {
        "accuracy": counts["ok"] / total,
        "samples": len(verdicts),
        "failures": {v: counts[v] for v in VERDICTS if v != "ok" and counts[v]},
    }


def pair_named(caption: str) -> tuple[str, str] | None:
    """The (colour, shape) a caption asks for: its first colour word and first shape word."""
    words = caption.lower().replace(",", " ").split()
    color = next((w for w in words if w in COLORS), None)
    kind = next((w for w in words if w in SHAPES), None)
    return None if color is None or kind is None else (color, kind)


def judge_folder(folder: str | Path, holdout: list[str]) -> dict:
    """Seen vs never-seen accuracy and failure counts of a folder of drawn images.

    Each image's same-stem ``.txt`` names the pair it was asked for (its first line, e.g.
    "a large red circle in the center"); images whose caption names no pair are counted
    under ``skipped``.
    """
    held = parse_pairs(holdout)
    verdicts: dict[str, list[str]] = {"seen": [], "unseen": []}
    skipped = 0
    for image, text in find_pairs(folder):
        lines = read_captions(Path(text))
        pair = pair_named(lines[0]) if lines else None
        if pair is None:
            skipped += 1
            continue
        group = "unseen" if pair in held else "seen"
        verdicts[group].append(judge(load_input(image), *pair))
    return {**{g: _summary(v) for g, v in verdicts.items()}, "skipped": skipped}


@torch.no_grad()
def tokenizer_report(vae: DiscreteVAE, holdout: list[str], per_pair: int = 12) -> dict:
    """Reconstruction of clean renders, seen vs never-seen pairs: PSNR (dB, mean over
    images) and the share of reconstructions the detector reads as the rendered pair.

    Half the renders are large, half small; a quarter are centred, the rest at random
    places (seeded), so both groups are measured on the same layouts.
    """
    size = vae.cfg.image_size
    rng = random.Random(0)
    layouts = [
        ("large" if i < per_pair // 2 else "small", "in the center" if i % 4 == 0 else None)
        for i in range(per_pair)
    ]
    layouts = [(s, p or rng.choice(list(PLACES))) for s, p in layouts]
    report = {}
    for group, pairs in pairs_by_group(holdout).items():
        psnrs, verdicts = [], []
        for color, kind in pairs:
            images = [render([Shape(color, kind, s, PLACES[p])], size) for s, p in layouts]
            x = torch.stack([pil_to_tensor(im, size) for im in images])
            y = vae.decode(vae.encode(x)).clamp(0, 1)
            mse = ((y - x) ** 2).flatten(1).mean(1).clamp_min(1e-10)
            psnrs += (10 * torch.log10(1 / mse)).tolist()
            pixels = (y.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
            verdicts += [judge(p, color, kind) for p in pixels]
        report[group] = {
            "psnr": float(np.mean(psnrs)) if psnrs else None,
            "detector_ok": _summary(verdicts)["accuracy"] if verdicts else None,
            "images": len(psnrs),
        }
    return report


def _judged(pipe, pairs, template: str, **call) -> dict:
    """Sample every pair's prompt with ``pipe(**call)`` and summarise the verdicts."""
    verdicts = []
    for color, kind in pairs:
        out = pipe(template.format(color=color, shape=kind), **call)
        verdicts += [judge(im, color, kind) for im in out.images]
    return _summary(verdicts)


def defaults_report(
    pipe: DALLEPipeline,
    holdout: list[str],
    per_prompt: int = 8,
    seed: int = 0,
    template: str = TEMPLATE,
    progress: bool = False,
) -> dict:
    """Seen vs never-seen accuracy with the model folder's recommended settings
    (``sampling.json``: options and reranking), exactly as ``pipe(prompt)`` samples."""
    call = dict(num_images=per_prompt, seed=seed, progress=progress)
    return {
        "settings": pipe.recommended.describe(),
        **{g: _judged(pipe, p, template, **call) for g, p in pairs_by_group(holdout).items()},
    }


def composition_report(
    pipe: DALLEPipeline,
    holdout: list[str],
    scales: list[float],
    per_prompt: int = 8,
    rerank_candidates: int = 0,
    options: SamplingOptions | None = None,
    seed: int = 0,
    template: str = TEMPLATE,
    progress: bool = False,
) -> list[dict]:
    """Seen vs never-seen accuracy for each guidance scale (one dict per scale).

    ``rerank_candidates > per_prompt`` adds the reranked figure: ``rerank_candidates``
    samples per prompt, the best ``per_prompt`` kept by the pipeline's scorer.
    ``options`` gives temperature / top-k / top-p / guidance_top_p; its ``cond_scale`` is
    replaced by each of ``scales``.
    """
    options = options or SamplingOptions()
    groups = pairs_by_group(holdout)
    rows = []
    for scale in scales:
        opts = replace(options, cond_scale=scale)
        row: dict = {"cond_scale": scale}
        modes = [("plain", per_prompt, False)]
        if rerank_candidates > per_prompt:
            modes.append(("reranked", rerank_candidates, True))
        for mode, n, rerank in modes:
            call = dict(num_images=n, seed=seed, rerank=rerank, progress=progress)
            call.update(keep=per_prompt if rerank else None, options=opts)
            for group, pairs in groups.items():
                row[f"{mode}_{group}"] = _judged(pipe, pairs, template, **call)
        rows.append(row)
    return rows
