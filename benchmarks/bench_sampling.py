"""Sampling speed: image tokens/s, cached vs full recompute, guided vs unguided, peak memory.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_sampling.py            # CPU, 2 threads
    python benchmarks/bench_sampling.py --device cuda

Prints one JSON document. For every grid (16×16, 32×32) and batch (1, 8, 32):

* ``cached``: a whole :func:`dalle1.sampling.sample_codes` call (prefill + one cached
  step per code), median of ``--repeats`` runs after one warm-up run;
* ``guided``: the same with classifier-free guidance (cond_scale 3: 2B rows);
* ``recompute``: sampling with ``use_cache=False``, which re-reads the whole stream
  for every code. Running it to the end takes many minutes at 32×32 on a CPU, so
  unless the run is small (batch × codes ≤ ``--full-recompute-max``) the time of a
  single recompute step is measured at ``--points`` prefix lengths spread over
  0 … N−1 and the total is the sum over all N steps of the piecewise-linear
  interpolation of those times (``recompute.method`` says which was done).
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
    setup,
    timed,
)

from dalle1.sampling import filter_logits, pick, sample_codes  # noqa: E402


def captions(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    text = torch.randint(2, TEXT_VOCAB - TEXT_LEN, (batch, TEXT_LEN), generator=g)
    null = torch.arange(TEXT_VOCAB - TEXT_LEN, TEXT_VOCAB)  # the per-position pads
    return text.to(device), null.to(device)


def bench_sample(model, text, null, device, repeats: int, **kw) -> dict:
    """Median wall / CPU time of whole sample_codes calls (first run = warm-up)."""
    gens = [torch.Generator(device).manual_seed(i) for i in range(len(text))]

    def run():
        sample_codes(model, text, null_text=null, generators=gens, top_k=64, **kw)

    timed(run, device)  # warm-up
    with PeakMemory(device) as mem:
        times = [timed(run, device) for _ in range(repeats)]
    wall = median([t[0] for t in times])
    n = len(text) * model.shape.num_codes
    return {
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
    ap.add_argument("--attention", default="dalle", choices=["dalle", "dense"])
    ap.add_argument("--grids", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    ap.add_argument("--points", type=int, default=6, help="prefix lengths timed for recompute")
    ap.add_argument("--full-recompute-max", type=int, default=256, help="batch × codes limit")
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast (CUDA)")
    ap.add_argument("--no-recompute", action="store_true")
    args = ap.parse_args()
    device = setup(args.device, args.threads)

    results = []
    for grid in args.grids:
        model = build_model(grid, args.attention, device).eval()
        for batch in args.batches:
            text, null = captions(batch, device)
            row = {"grid": grid, "codes": grid * grid, "batch": batch}
            row["cached"] = bench_sample(
                model, text, null, device, args.repeats, autocast=args.autocast
            )
            row["guided"] = bench_sample(
                model, text, null, device, args.repeats, cond_scale=3.0, autocast=args.autocast
            )
            row["guided_over_unguided"] = round(
                row["guided"]["seconds"] / row["cached"]["seconds"], 3
            )
            if not args.no_recompute:
                with torch.autocast(device.type, torch.bfloat16, enabled=args.autocast):
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
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "model": model_info(args.attention),
        "sampling": {"top_k": 64, "temperature": 1.0, "guided_cond_scale": 3.0},
        "autocast_bf16": args.autocast,
        "note": "seconds are medians of whole runs; cpu_seconds is process CPU time "
        "(useful when the machine is shared: wall time then stretches, CPU time less)",
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
