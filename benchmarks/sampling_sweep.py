#!/usr/bin/env python
"""Do the model folder's default sampling settings (sampling.json) sample as well as the
best hand-tuned ones? A fresh measurement on held-out captions.

    python benchmarks/sampling_sweep.py --model outputs/demo/dalle/model --data data/shapes \
        --oracle shapes

For every setting of a grid (every combination of the ``--grid`` values, by default the
sweep of the model's own config, ``sample.sweep``, x rerank ``--candidates``; rerank by
the folder's scorer: clip/ if present, else the transformer's likelihood) and for the folder's
defaults (the pipeline called with no sampling argument), ``--images`` images are sampled
for each of ``--prompts`` held-out captions (the model's own train/held-out split of
``--data``), with seeds unlike the ones training's sweep used. Each image is scored

* by the package's own judge (dalle1.recommend.judge_images: the clip scorer when the
  folder has one, else the transformer's likelihood of the re-encoded image): 1 when its
  own caption fits it better than each of its nearest rival captions among the prompts;
* by an independent pixel oracle when the data set has one (``--oracle shapes`` reads
  colour / shape / size / place; ``--oracle glyphs`` reads colour and digit by template
  matching): the share of images showing everything their caption states.

Prints JSON: one row per setting, the defaults' row, and whether the defaults are within
one standard error of the best hand-tuned setting by the judge (the best of many noisy
rows is biased upwards, so the standard error of the difference is printed too).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from dalle1.data import find_pairs, split_pairs
from dalle1.data.captions import read_captions
from dalle1.pipeline import DALLEPipeline
from dalle1.recommend import Recommended, judge_images, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))


def oracle_for(name: str):
    """caption, image (3, H, W) -> bool, or None."""
    if name == "shapes":
        from rerank_figures import matches

        return lambda image, caption: matches(image, caption)
    if name == "glyphs":
        from dalle1.data.glyphs import parse_glyph_caption, read_glyph

        def check(image, caption):
            want = parse_glyph_caption(caption)
            seen = read_glyph(image)
            return seen is not None and all(seen[k] == v for k, v in want.items())

        return check
    return None


def parse_grid(items: list[str]) -> dict[str, list]:
    """["cond_scale=1,2", "top_k=none,32"] -> {"cond_scale": [1.0, 2.0], "top_k": [None, 32]}:
    any field of dalle1.sampling.SamplingOptions, values as JSON ("none" = null)."""
    grid = {}
    for item in items:
        key, _, values = item.partition("=")
        grid[key.strip()] = [
            None if v.strip().lower() in ("none", "null") else json.loads(v)
            for v in values.split(",")
        ]
    return grid


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    v = values.float()
    se = float(v.std(unbiased=True) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    return float(v.mean()), se


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="the captioned folder the model trained on")
    p.add_argument("--oracle", choices=("shapes", "glyphs", "none"), default="none")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--images", type=int, default=8, help="images kept per caption and setting")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="OPTION=V1,V2",
        help="sampling option and the values tried (repeatable; default: the model's "
        "sample.sweep, else cond_scale=1,1.5,2,3,4,6)",
    )
    p.add_argument("--candidates", default="1,4")
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = DALLEPipeline.from_pretrained(args.model)
    d = pipe.config.data
    _, val = split_pairs(find_pairs(args.data), d.val_fraction, d.seed)
    firsts = [read_captions(c)[0] for _, c in val]
    prompts = list(dict.fromkeys(firsts))[: args.prompts]
    oracle = oracle_for(args.oracle)
    n = args.images

    def measure(label: str, num: int = n, **call) -> dict:
        t0 = time.time()
        out = pipe(prompts, num_images=num, seed=args.seed, **call)
        images = out.pixels
        own = torch.tensor([prompts.index(q) for q in out.prompts])
        judged = judge_images(images, own, prompts, pipe.tokenizer, pipe.clip, pipe.dalle, pipe.vae)
        row = {"setting": label, "images": len(images)}
        row["judge"], row["judge_se"] = mean_se(judged)
        if oracle is not None:
            hits = torch.tensor([oracle(im, q) for im, q in zip(images, out.prompts)])
            row["oracle"], row["oracle_se"] = mean_se(hits)
        row["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(row), file=sys.stderr, flush=True)
        return row

    rows = []
    sample = pipe.config.sample
    grid = parse_grid(args.grid) or dict(sample.sweep) or {"cond_scale": [1, 1.5, 2, 3, 4, 6]}
    grid = {k: [float(v) if k == "cond_scale" else v for v in vs] for k, vs in grid.items()}
    for c in [int(x) for x in args.candidates.split(",")]:
        for opts in settings(dict(sample.options), grid):
            label = Recommended(opts, c, "clip" if pipe.clip else "likelihood").describe()
            if c > 1:  # the pipeline's reranking: the best n of n x c per caption
                rows.append(measure(label, n * c, options=opts, rerank=True, keep=n))
            else:
                rows.append(measure(label, options=opts, rerank=False))
    defaults = measure(f"defaults: {pipe.recommended.describe()}")
    best = max(rows, key=lambda r: r["judge"])
    result = {
        "model": args.model,
        "judge": "clip" if pipe.clip is not None else "likelihood",
        "oracle": args.oracle,
        "prompts": prompts,
        "grid": grid,
        "recommended": pipe.recommended.to_dict()["options"],
        "recommended_candidates": pipe.recommended.candidates,
        "rows": rows,
        "defaults": defaults,
        "best_by_judge": best["setting"],
        "defaults_within_one_se_of_best": defaults["judge"] >= best["judge"] - best["judge_se"],
        "defaults_minus_best_judge": round(defaults["judge"] - best["judge"], 4),
        # the standard error of that difference (independent samples)
        "difference_se": round(math.hypot(defaults["judge_se"], best["judge_se"]), 4),
        "best_by_oracle": max(rows, key=lambda r: r.get("oracle", 0))["setting"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
