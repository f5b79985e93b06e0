"""Sampling speed against the memory-bandwidth bound: image tokens/s, bytes per step, GB/s.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_sampling.py            # CPU, 2 threads
    python benchmarks/bench_sampling.py --device cuda                      # GPU, bf16 weights

Prints one JSON document (and one progress line per configuration on stderr). In the
same run:

* ``bandwidth``: the machine's measured memory bandwidth, from copying a large tensor
  (256 MB on a CPU, 2 GB on a GPU; the best of several copies; read + written bytes over
  the time, STREAM's "copy" convention);
* for every attention (dense, ``dalle``), grid (16×16, 32×32) and batch (1, 8, 32):
  ``cached`` — a whole :func:`dalle1.sampling.sample_codes` call (prefill + one cached
  step per code, top-k 64), median of ``--repeats`` runs after one warm-up run
  (``first_call_seconds`` is that warm-up: with ``--decode compile`` it holds the
  compilation);
* ``bytes_per_step``: what one decode step must read, averaged over the generation: the
  weights it multiplies (every layer, the final norm and the image head, one embedding
  row; ``weight_bytes``) plus, for every row of the batch, the cached keys and values
  its masks allow at that position (``kv_bytes_per_row``);
* ``bound_tokens_per_s`` = batch × bandwidth / bytes_per_step: the rate at which merely
  reading those bytes once per step would run; ``fraction_of_bound`` = measured / bound;
  ``fraction_of_bound_cpu_time`` the same with tokens per second of process CPU time
  (on a shared machine wall time stretches with the load, CPU time much less; the cached
  loop runs on one thread below 32 rows, where a CPU second is a second of one core).
  (A weight set that fits in the last-level cache can beat the DRAM figure.)

Options: ``--guided`` adds classifier-free guidance runs (2B rows); ``--recompute`` adds
``use_cache=False`` sampling (extrapolated from timed steps when the run would be long:
``recompute.method`` says which); ``--decode`` picks the step form
(:func:`dalle1.decoding.decode_mode`). On a GPU the weights are cast to bfloat16 once
(``--dtype``); nothing is autocast.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first torch import

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from _common import (  # noqa: E402
    TEXT_LEN,
    TEXT_VOCAB,
    PeakMemory,
    build_model,
    median,
    model_info,
    openmp_env,
    setup,
    timed,
)

from dalle1.decoding import CACHE_DTYPES, cache_dtype  # noqa: E402
from dalle1.sampling import filter_logits, pick, sample_codes  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def copy_bandwidth(device: torch.device, repeats: int = 5) -> dict:
    """Bytes read + written per second by the best of ``repeats`` copies of a large tensor."""
    mb = 2048 if device.type == "cuda" else 256
    src = torch.ones(mb * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults, allocator
    times = [timed(lambda: dst.copy_(src), device)[0] for _ in range(repeats)]
    best = min(times)
    return {
        "method": f"copy of a {mb} MB float32 tensor, best of {repeats}",
        "gb_per_s": round(2 * src.numel() * 4 / best / 1e9, 2),
        "median_gb_per_s": round(2 * src.numel() * 4 / median(times) / 1e9, 2),
    }


def step_bytes(model, batch: int, cache: torch.dtype) -> dict:
    """Bytes one decode step reads, averaged over the steps of a whole generation."""
    w = model.decode_weights()
    n_text, N = model.shape.text_len + 1, model.shape.num_codes
    per_key = 2 * w.heads * w.dim_head * cache.itemsize
    keys = 0  # keys read by one row over all steps, all layers
    for kind in model.kinds:
        reads = model.key_reads(kind)
        for p in range(n_text, n_text + N - 1):  # the cached steps (code 0 .. N-2 fed)
            r = reads[p]
            keys += (
                len(r)
                if isinstance(r, torch.Tensor)
                else sum(len(range(x.start, x.stop, x.step)) for x in r)
            )
    kv = per_key * keys / (N - 1)
    weights = w.nbytes()
    return {
        "weight_bytes": weights,
        "kv_bytes_per_row": round(kv),
        "bytes_per_step": round(weights + batch * kv),
    }


def captions(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    text = torch.randint(2, TEXT_VOCAB - TEXT_LEN, (batch, TEXT_LEN), generator=g)
    null = torch.arange(TEXT_VOCAB - TEXT_LEN, TEXT_VOCAB)  # the per-position pads
    return text.to(device), null.to(device)


def bench_sample(model, text, null, device, repeats: int, **kw) -> dict:
    """Median wall / CPU time of whole sample_codes calls (first run = warm-up, timed apart)."""
    gens = [torch.Generator(device).manual_seed(i) for i in range(len(text))]

    def run():
        sample_codes(model, text, null_text=null, generators=gens, top_k=64, **kw)

    first = timed(run, device)[0]  # warm-up (with --decode compile: the compilation)
    with PeakMemory(device) as mem:
        times = [timed(run, device) for _ in range(repeats)]
    wall = median([t[0] for t in times])
    n = len(text) * model.shape.num_codes
    return {
        "first_call_seconds": round(first, 3),
        "seconds": round(wall, 4),
        "cpu_seconds": round(median([t[1] for t in times]), 4),
        "tokens_per_s": round(n / wall, 2),
        **mem.report(),
    }


def bench_recompute(model, text, device, points: int, repeats: int, full_max: int) -> dict:
    N = model.shape.num_codes
    n_tokens = len(text) * N
    if n_tokens <= full_max:
        timed(lambda: sample_codes(model, text, use_cache=False), device)  # warm-up
        with PeakMemory(device) as mem:
            times = [
                timed(lambda: sample_codes(model, text, use_cache=False), device)
                for _ in range(repeats)
            ]
        wall = median([t[0] for t in times])
        return {
            "method": "measured: whole use_cache=False sampling runs",
            "seconds": round(wall, 4),
            "cpu_seconds": round(median([t[1] for t in times]), 4),
            "tokens_per_s": round(n_tokens / wall, 2),
            **mem.report(),
        }
    lengths = sorted({round(i * (N - 1) / (points - 1)) for i in range(points)})
    codes = torch.randint(0, model.shape.image_vocab, (len(text), N), device=device)
    gen = torch.Generator(device).manual_seed(0)

    def one_step(t):
        with torch.inference_mode():
            logits = model.next_logits_uncached(text, codes[:, :t])
            pick(filter_logits(logits.float(), 64), 1.0, gen)

    one_step(lengths[len(lengths) // 2])  # warm-up
    step_wall, step_cpu = [], []
    with PeakMemory(device) as mem:
        for t in lengths:
            times = [timed(lambda t=t: one_step(t), device) for _ in range(repeats)]
            step_wall.append(median([x[0] for x in times]))
            step_cpu.append(median([x[1] for x in times]))

    def total(per_step: list[float]) -> float:
        # piecewise-linear interpolation of the step time over every prefix length 0 … N-1
        s = 0.0
        for (a, ta), (b, tb) in zip(zip(lengths, per_step), zip(lengths[1:], per_step[1:])):
            s += sum(ta + (tb - ta) * (t - a) / (b - a) for t in range(a, b))
        return s + per_step[-1]

    wall = total(step_wall)
    return {
        "method": f"extrapolated: one recompute step timed at prefix lengths {lengths} "
        f"(median of {repeats}), interpolated linearly over all {N} steps",
        "seconds": round(wall, 3),
        "cpu_seconds": round(total(step_cpu), 3),
        "tokens_per_s": round(n_tokens / wall, 2),
        "step_seconds_at_lengths": [round(x, 4) for x in step_wall],
        **mem.report(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument(
        "--attention", nargs="+", default=["dense", "dalle"], choices=["dalle", "dense"]
    )
    ap.add_argument("--grids", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    ap.add_argument(
        "--dtype", choices=list(DTYPES), help="weights (default: cpu float32, cuda bf16)"
    )
    ap.add_argument("--decode", choices=["auto", "eager", "compile", "graph"], default=None)
    ap.add_argument(
        "--cache-dtype", choices=list(CACHE_DTYPES), help="key/value cache (default: weights')"
    )
    ap.add_argument("--guided", action="store_true", help="also time guided sampling (2B rows)")
    ap.add_argument("--recompute", action="store_true", help="also time use_cache=False")
    ap.add_argument("--points", type=int, default=6, help="prefix lengths timed for recompute")
    ap.add_argument("--full-recompute-max", type=int, default=256, help="batch × codes limit")
    args = ap.parse_args()
    device = setup(args.device, args.threads)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]

    bandwidth = copy_bandwidth(device)
    print(json.dumps({"bandwidth": bandwidth}), file=sys.stderr, flush=True)
    gbs = bandwidth["gb_per_s"] * 1e9
    results = []
    for attention in args.attention:
        for grid in args.grids:
            model = build_model(grid, attention, device).eval().to(dtype)
            for batch in args.batches:
                text, null = captions(batch, device)
                row = {"attention": attention, "grid": grid, "codes": grid * grid, "batch": batch}
                kw = {"decode": args.decode, "cache_dtype": args.cache_dtype}
                row["cached"] = bench_sample(model, text, null, device, args.repeats, **kw)
                row.update(step_bytes(model, batch, cache_dtype(args.cache_dtype, dtype)))
                bound = batch * gbs / row["bytes_per_step"]
                row["bound_tokens_per_s"] = round(bound, 1)
                row["fraction_of_bound"] = round(row["cached"]["tokens_per_s"] / bound, 3)
                # the same from process CPU time: what the run gets from the cores it uses,
                # whatever else the machine runs (one thread below 32 rows: CPU s = core s)
                cpu_rate = len(text) * model.shape.num_codes / row["cached"]["cpu_seconds"]
                row["fraction_of_bound_cpu_time"] = round(cpu_rate / bound, 3)
                if args.guided:
                    row["guided"] = bench_sample(
                        model, text, null, device, args.repeats, cond_scale=3.0, **kw
                    )
                    row["guided_over_unguided"] = round(
                        row["guided"]["seconds"] / row["cached"]["seconds"], 3
                    )
                if args.recompute:
                    row["recompute"] = bench_recompute(
                        model, text, device, args.points, args.repeats, args.full_recompute_max
                    )
                    row["cached_speedup"] = round(
                        row["recompute"]["seconds"] / row["cached"]["seconds"], 2
                    )
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)  # progress, one line per row
    report = {
        "benchmark": "sampling",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(),
        "openmp": openmp_env(),
        "model": model_info(" | ".join(args.attention)),
        "weights_dtype": str(dtype).removeprefix("torch."),
        "decode": args.decode or os.environ.get("DALLE1_DECODE") or "auto",
        "cache_dtype": str(cache_dtype(args.cache_dtype, dtype)).removeprefix("torch."),
        "sampling": {"top_k": 64, "temperature": 1.0, "guided_cond_scale": 3.0},
        "bandwidth": bandwidth,
        "note": "seconds are medians of whole runs; cpu_seconds is process CPU time "
        "(useful when the machine is shared: wall time then stretches, CPU time less); "
        "bound_tokens_per_s = batch x bandwidth / bytes_per_step",
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
