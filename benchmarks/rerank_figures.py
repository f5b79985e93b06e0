#!/usr/bin/env python
"""Acceptance figures for the contrastive scorer on the built-in shapes set (issue 5).

    python benchmarks/rerank_figures.py --model outputs/demo/with_clip --data data/shapes

Prints JSON with
  * retrieval: image -> own caption among batches of 32 held-out pairs (and text -> image);
  * zero-shot colour / shape accuracy on held-out real images;
  * reranking: N samples per held-out prompt, best K by the scorer; the fraction of samples
    that match their caption, judged (a) by the scorer itself (best of all prompts) and
    (b) by an independent pixel "oracle" that reads colour, shape, size and place of a
    single-shape image straight from its pixels (validated on the real held-out images).
(b) is the honest figure: the scorer judging its own picks is circular.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dalle1.checkpoint import load_clip
from dalle1.clip import zero_shot
from dalle1.config import DataConfig
from dalle1.data import CaptionedFolder, find_pairs, split_pairs
from dalle1.data.shapes import BACKGROUND, COLORS, PLACES, SHAPES, SIZES
from dalle1.evaluation import retrieval_accuracy
from dalle1.pipeline import DALLEPipeline
from dalle1.rerank import rank
from dalle1.text import TextTokenizer


def read_scene(image: torch.Tensor) -> dict[str, str] | None:
    """(3, H, W) in [0, 1] -> colour, shape, size and place of its one shape, read from pixels."""
    size = image.shape[-1]
    bg = torch.tensor(BACKGROUND, dtype=torch.float32)[:, None, None] / 255
    diff = (image - bg).abs().amax(0)
    fg = diff > 0.25
    if fg.sum() < 4:
        return None
    core = diff > 0.5
    pixels = image[:, core if core.sum() >= 2 else fg].mean(-1)
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255
    color = list(COLORS)[int(((palette - pixels) ** 2).sum(-1).argmin())]
    ys, xs = torch.nonzero(fg, as_tuple=True)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    w, h = float(x1 - x0 + 1), float(y1 - y0 + 1)
    fill = float(fg.sum()) / (w * h)
    shape = "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle"
    side = max(w, h) / size
    kind = "small" if side < sum(SIZES.values()) / 2 else "large"
    cx, cy = float(x0 + x1 + 1) / 2 / size, float(y0 + y1 + 1) / 2 / size
    place = min(PLACES, key=lambda p: (PLACES[p][0] - cx) ** 2 + (PLACES[p][1] - cy) ** 2)
    return {"color": color, "shape": shape, "size": kind, "place": place}


def parse_caption(caption: str) -> dict[str, str]:
    """'a small red circle at the top left' -> the attributes it states."""
    words = caption.split()
    out = {}
    for w in words:
        if w in COLORS:
            out["color"] = w
        elif w in SHAPES:
            out["shape"] = w
        elif w in SIZES:
            out["size"] = w
    for place in sorted(PLACES, key=len, reverse=True):
        if caption.endswith(place):
            out["place"] = place
            break
    return out


def matches(image: torch.Tensor, caption: str, keys: tuple[str, ...] | None = None) -> bool:
    """Does the image show what the caption states (only ``keys`` of it, if given)?"""
    scene = read_scene(image)
    want = {k: v for k, v in parse_caption(caption).items() if keys is None or k in keys}
    return scene is not None and all(scene[k] == v for k, v in want.items())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="data/shapes")
    p.add_argument(
        "--prompts", type=int, default=16, help="held-out prompts for reranking (0: skip)"
    )
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--keep", type=int, default=4)
    p.add_argument("--prompt-kind", choices=("full", "short"), default="short")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.prompts > 0:
        pipe = DALLEPipeline.from_pretrained(args.model)
        clip, tok, d = pipe.clip, pipe.tokenizer, pipe.config.data
    else:  # scorer figures only: the folder needs tokenizer.json and clip/
        clip = load_clip(args.model)
        tok = TextTokenizer.load(Path(args.model) / "tokenizer.json", clip.text_len)
        d = DataConfig()
    _, val = split_pairs(find_pairs(args.data), d.val_fraction, d.seed)
    held = CaptionedFolder(None, clip.image_size, val)
    images = torch.stack([held[i][0] for i in range(len(held))])
    first = [c[0] for c in held.captions]
    out: dict = {"model": args.model, "held_out_pairs": len(held)}
    out.update(retrieval_accuracy(clip, tok, images, first))
    truth = [parse_caption(c) for c in first]
    colors, shapes = list(COLORS), list(SHAPES)
    for name, labels, key, templates in (
        ("zero_shot_color_a_x", colors, "color", ["a {}"]),
        ("zero_shot_color_ensemble", colors, "color", [f"a {{}} {s}" for s in SHAPES]),
        ("zero_shot_shape_a_x", shapes, "shape", ["a {}"]),
        ("zero_shot_shape_ensemble", shapes, "shape", [f"a {c} {{}}" for c in COLORS]),
    ):
        probs = zero_shot(clip, tok, images, labels, templates)
        guess = [labels[int(i)] for i in probs.argmax(-1)]
        out[name] = sum(g == t[key] for g, t in zip(guess, truth)) / len(truth)
    out["oracle_accuracy_on_real_images"] = sum(
        matches(im, c) for im, c in zip(images, first)
    ) / len(first)

    if args.prompts <= 0:
        print(json.dumps(out, indent=2))
        return
    # reranking on held-out prompts
    if args.prompt_kind == "short":  # "a red circle": colour and shape only
        pool = [f"a {t['color']} {t['shape']}" for t in truth]
    else:
        pool = first
    prompts = list(dict.fromkeys(pool))[: args.prompts]
    prompt_emb = clip.encode_text(tok.encode(prompts))
    n, k = args.num_images, args.keep
    scores, oracle, oracle_color, scorer_match = [], [], [], []
    t0, cpu0 = time.time(), time.process_time()
    for j, prompt in enumerate(prompts):
        res = pipe(prompt, num_images=n, seed=1000 * j)
        ims = pipe.vae.decode(res.codes).clamp(0, 1)
        emb = clip.encode_image(ims)
        scores.append((emb @ prompt_emb[j]).cpu())
        oracle.append(torch.tensor([matches(im, prompt) for im in ims]))
        oracle_color.append(torch.tensor([matches(im, prompt, ("color",)) for im in ims]))
        scorer_match.append((emb @ prompt_emb.t()).argmax(-1).cpu() == j)
    s, o, m = torch.cat(scores), torch.cat(oracle).float(), torch.cat(scorer_match).float()
    oc = torch.cat(oracle_color).float()
    top = rank(s, n, k)
    out.update(
        {
            "rerank_prompts": prompts,
            "rerank_num_images": n,
            "rerank_keep": k,
            "score_mean_all": s.mean().item(),
            "score_mean_reranked": s[top].mean().item(),
            "oracle_match_all": o.mean().item(),
            "oracle_match_reranked": o[top].mean().item(),
            "oracle_color_match_all": oc.mean().item(),
            "oracle_color_match_reranked": oc[top].mean().item(),
            "scorer_caption_match_all": m.mean().item(),
            "scorer_caption_match_reranked": m[top].mean().item(),
            "sampling_seconds": time.time() - t0,
            "sampling_cpu_seconds": time.process_time() - cpu0,
        }
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
