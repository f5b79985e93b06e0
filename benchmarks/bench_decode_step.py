"""One cached decode step, dalle1's path vs x-transformers' own cached forward.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_decode_step.py

``DALLE.step`` runs its layers through :mod:`dalle1.decoding` (q, k, v in one product,
preallocated key/value buffers; a sparse-mask query reads only the keys its mask
allows). The reference is the x-transformers path: each ``Decoder`` layer called with its cache
(``cache=``, ``return_hiddens=True``) and the mask's row as ``attn_bias``, which
concatenates the whole cache every step. Both are fed the same prefix; the script
prints the median time of one step at a few stream positions, and the largest
difference between the two paths' logits (they compute the same function).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first torch import

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from _common import TEXT_LEN, TEXT_VOCAB, build_model, median, model_info, setup, timed  # noqa: E402


def reference_prefill(model, text):
    h = model.embed_text(text)
    caches = []
    for layer, kind in zip(model.layers, model.kinds):
        bias = model.attn_bias(kind, 0, h.shape[1])
        h, inter = layer(h, attn_bias=bias, return_hiddens=True)
        caches.append(inter)
    return caches, h.shape[1]


def reference_step(model, code, index, caches, length):
    x = model.embed_codes(code[:, None], index)
    new = []
    for layer, kind, cache in zip(model.layers, model.kinds, caches):
        bias = model.attn_bias(kind, length, length + 1)
        x, inter = layer(x, attn_bias=bias, cache=cache, return_hiddens=True)
        new.append(inter)
    return model.to_image_logits(model.norm(x)[:, -1]), new, length + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    device = setup(args.device, args.threads)
    out = {"device": str(device), "grid": args.grid, "batch": args.batch, "rows": []}
    for attention in ("dalle", "dense"):
        model = build_model(args.grid, attention, device).eval()
        n = args.grid * args.grid
        g = torch.Generator().manual_seed(0)
        text = torch.randint(2, TEXT_VOCAB - TEXT_LEN, (args.batch, TEXT_LEN), generator=g)
        codes = torch.randint(0, 1024, (args.batch, n), generator=g)
        text, codes = text.to(device), codes.to(device)
        for at in (n // 4, n // 2, n - 2):
            with torch.inference_mode():
                _, cache = model.prefill(text)
                ref, length = reference_prefill(model, text)
                for i in range(at):  # bring both caches to code `at`
                    _, cache = model.step(codes[:, i], i, cache)
                    _, ref, length = reference_step(model, codes[:, i], i, ref, length)
                ours = partial(model.step, codes[:, at], at, cache)
                theirs = partial(reference_step, model, codes[:, at], at, ref, length)
                # re-run step `at` from the same prefix, alternating the two paths
                ours_t, ref_t = [], []
                for _ in range(args.repeats):
                    ours_t.append(timed(ours, device)[0])
                    ref_t.append(timed(theirs, device)[0])
                a, _ = model.step(codes[:, at], at, cache)
                b, _, _ = reference_step(model, codes[:, at], at, ref, length)
            row = {
                "attention": attention,
                "code_index": at,
                "ours_ms": round(median(ours_t) * 1e3, 3),
                "x_transformers_cache_ms": round(median(ref_t) * 1e3, 3),
                "speedup": round(median(ref_t) / median(ours_t), 2),
                "max_abs_logit_diff": float((a - b).abs().max()),
            }
            out["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    out["model"] = model_info("dalle | dense")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
