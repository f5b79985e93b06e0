"""Training with DALL-E's sparse masks vs dense attention: speed and memory, one run.

    python benchmarks/bench_attention.py                                     # ~8 min, 2 busy cores
    python benchmarks/bench_attention.py --precision 32-true                 # float32 on any CPU
    python benchmarks/bench_attention.py --precision bf16-mixed --memory     # bf16 autocast, no RSS runs
    python benchmarks/bench_attention.py --speed 16x8 --memory 16 --steps 3  # a quick look
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_attention.py --precision bf16-mixed  # no spin

The model is the side-by-side comparison's shape: dim 256, depth 6, 8 heads × 32, ff ×4,
text length 32 (1000 BPE tokens + 32 pads), image vocabulary 1024, random weights;
``dalle`` is the paper's schedule (row, column, row, row, row, conv 11×11). AdamW is
the trainer's (fused into one kernel, :func:`dalle1.training.systems.fused_adamw`).
``--precision`` is the trainer's: ``auto`` (the default, as ``train.precision``) is
bf16 autocast on a CPU with bf16 instructions (this model is 256 wide) and float32 on
others (:mod:`dalle1.training.precision`; the report gives the one it ran).
``bf16-mixed`` runs every step under CPU bf16 autocast with the attention
kernels the trainer picks for it (``set_flash_attention(model, False)``: matmul blocks
for the sparse layers; the fused kernel for dense layers this long, ``PLAIN_DENSE_MAX``).

* **speed**: one training step = forward over the whole stream, DALL-E's loss, backward,
  AdamW. Dense and ``dalle`` models live in one process and their steps alternate
  (A B B A …), so both see the same machine load; the figures are medians over the
  timed steps and the ratio is taken within this run (wall and process CPU time).
* **memory** (whole model): a fresh process per (attention, grid) trains a few steps and
  reports its peak resident memory above what it held before the timed steps (the
  model, optimizer state and libraries), with glibc told to hand freed blocks back
  (``MALLOC_MMAP_THRESHOLD_``) so that the high-water mark follows live tensors.
* **layer memory**: what one attention layer keeps for its backward pass (bytes of the
  distinct tensors autograd saves, counted with ``saved_tensors_hooks``) per kind and
  grid, and per image code: a constant per code is linear growth.

Allocator: as the trainer sets it (``train.keep_freed_memory``,
:mod:`dalle1.training.allocator`): glibc keeps freed memory for the next step instead of
faulting it in again; ``--allocator glibc`` times glibc's default.

Threads: as the trainer runs them. dalle1 is imported before torch, so OpenMP gets the
spin ``import dalle1`` sets (``GOMP_SPINCOUNT=10000``) unless the environment names a
policy or a count. ``OMP_WAIT_POLICY=PASSIVE`` puts an idle thread to sleep at once, so
each of the sparse step's many small operations wakes it again: the sparse step, with
about twice dense's operations per second of work, loses more to the waking, and its
ratio to dense is a few percent lower (docs/benchmarks.md). The report records the
settings the process started with (``openmp``).

Prints one JSON document.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dalle1  # noqa: E402, F401  (before torch: its OpenMP spin, as in training)

# isort: split

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import openmp_env  # noqa: E402

from dalle1.config import DALLEConfig, TrainConfig  # noqa: E402
from dalle1.masks import KINDS  # noqa: E402
from dalle1.training.allocator import keep_freed_memory  # noqa: E402
from dalle1.training.precision import choose_precision, native_bf16  # noqa: E402
from dalle1.training.systems import fused_adamw, set_flash_attention  # noqa: E402
from dalle1.transformer import DALLE, StreamShape  # noqa: E402

MODEL = dict(dim=256, depth=6, heads=8, dim_head=32, ff_mult=4, conv_kernel=11)
TEXT_LEN, TEXT_BPE, IMAGE_VOCAB = 32, 1000, 1024


def build(attention: str, grid: int, seed: int = 0) -> DALLE:
    torch.manual_seed(seed)
    shape = StreamShape(TEXT_BPE + TEXT_LEN, TEXT_LEN, IMAGE_VOCAB, grid, bos_id=1)
    return DALLE(DALLEConfig(attention=attention, **MODEL), shape).train()


def batch_of(grid: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(2, TEXT_BPE, (batch, TEXT_LEN), generator=g)
    return text, torch.randint(0, IMAGE_VOCAB, (batch, grid * grid), generator=g)


def trainer(model: DALLE, text: torch.Tensor, codes: torch.Tensor, precision: str = "32-true"):
    """One training step as a function, under ``precision`` as the trainer runs it."""
    params = list(model.parameters())
    fused = fused_adamw(TrainConfig(precision=precision), params)  # as the trainer picks
    opt = torch.optim.AdamW(params, lr=3e-4, fused=fused or None)
    bf16 = precision == "bf16-mixed"
    set_flash_attention(model, not bf16)

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss, _ = model.loss(text, codes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def clock(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def speed(grid: int, batch: int, warmup: int, steps: int, precision: str) -> dict:
    """Dense and dalle training steps, interleaved in this process."""
    text, codes = batch_of(grid, batch)
    steps_of = {a: trainer(build(a, grid), text, codes, precision) for a in ("dense", "dalle")}
    times: dict[str, list[tuple[float, float]]] = {a: [] for a in steps_of}
    for _ in range(warmup):
        for step in steps_of.values():
            step()
    order = list(steps_of)
    for i in range(steps):
        for a in order if i % 2 == 0 else order[::-1]:
            times[a].append(clock(steps_of[a]))
    tokens = batch * (TEXT_LEN + grid * grid)
    row = {"grid": f"{grid}x{grid}", "batch": batch, "tokens_per_step": tokens, "steps": steps}
    for a, ts in times.items():
        wall, cpu = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        row[a] = {
            "step_s": round(wall, 3),
            "step_cpu_s": round(cpu, 3),
            "tokens_per_s": round(tokens / wall, 1),
            "walls": [round(t[0], 3) for t in ts],
        }
    row["dalle_speedup"] = {
        "wall": round(row["dense"]["step_s"] / row["dalle"]["step_s"], 2),
        "cpu": round(row["dense"]["step_cpu_s"] / row["dalle"]["step_cpu_s"], 2),
    }
    row["load_avg_1min"] = round(os.getloadavg()[0], 2)
    return row


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def memory_worker(attention: str, grid: int, batch: int, steps: int, precision: str) -> dict:
    """Run in a fresh process: peak RSS of training steps above the RSS before them."""
    step = trainer(build(attention, grid), *batch_of(grid, batch), precision)
    step()  # optimizer state and gradients exist from here on
    base = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    for _ in range(steps):
        step()
    peak = _status_mb("VmHWM")
    return {"base_mb": round(base, 1), "peak_mb": round(peak, 1), "step_mb": round(peak - base, 1)}


def memory(attention: str, grid: int, batch: int, steps: int, threads: int, precision: str) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--memory-worker", f"{attention},{grid},{batch},{steps}"]
    cmd += ["--threads", str(threads), "--precision", precision]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return {"attention": attention, "grid": f"{grid}x{grid}", "batch": batch, **json.loads(out)}


def saved_bytes(kind: str, grid: int, batch: int, fused: bool = True) -> int:
    """Bytes of the distinct storages one attention layer keeps for its backward pass
    (float32; a sparse layer through SDPA's fused kernel or, ``fused=False``, the matrix
    products bf16 training takes)."""
    model = build("dense", grid)
    heads, dim_head = MODEL["heads"], MODEL["dim_head"]
    size = TEXT_LEN + grid * grid  # the input stream: <bos>, text, codes but the last
    q, k, v = (torch.randn(batch, size, heads, dim_head, requires_grad=True) for _ in range(3))
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks

    def counted_hooks(inner_pack, inner_unpack):
        # attention.py keeps its gathered blocks as recipes under hooks of its own, and
        # inner hooks hide what they save from outer ones: count what they keep as tensors
        return hooks(lambda t: pack(inner_pack(t)), inner_unpack)

    from dalle1.attention import sparse_attention

    with (
        hooks(pack, lambda t: t),
        mock.patch.object(torch.autograd.graph, "saved_tensors_hooks", counted_hooks),
    ):
        if kind == "dense":
            a, b, c = (t.transpose(1, 2) for t in (q, k, v))
            F.scaled_dot_product_attention(a, b, c, is_causal=True)
        else:
            sparse_attention(q, k, v, model.block_plan(kind, q.device), fused=fused)
    return sum(storages.values())


def layer_memory(grids: list[int], batch: int) -> list[dict]:
    rows = []
    sparse = [k for k in KINDS if k != "dense"]
    kernels = [("dense", "fused")] + [(k, x) for k in sparse for x in ("fused", "products")]
    for kind, kernel in kernels:
        for grid in grids:
            nbytes = saved_bytes(kind, grid, batch, fused=kernel == "fused")
            rows.append(
                {
                    "kind": kind,
                    "kernel": kernel,
                    "grid": f"{grid}x{grid}",
                    "batch": batch,
                    "saved_mb": round(nbytes / 2**20, 2),
                    "saved_bytes_per_code_per_sample": round(nbytes / batch / (grid * grid)),
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--speed", nargs="*", default=["16x8", "32x4"], help="GRIDxBATCH")
    ap.add_argument("--memory", nargs="*", type=int, default=[16, 32, 48], help="grids")
    ap.add_argument("--memory-batch", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per attention")
    ap.add_argument("--precision", choices=["auto", "32-true", "bf16-mixed"], default="auto")
    ap.add_argument(
        "--allocator",
        choices=["keep", "glibc"],
        default="keep",
        help="keep: freed memory stays for the next step, as the trainer sets it "
        "(dalle1.training.allocator; the memory runs set their own); glibc: its default",
    )
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory() if args.allocator == "keep" else None
    args.precision = choose_precision(
        args.precision, "dalle", MODEL["dim"], "cpu", native_bf16("cpu")
    )
    if args.memory_worker:
        attention, grid, batch, steps = args.memory_worker.split(",")
        print(
            json.dumps(memory_worker(attention, int(grid), int(batch), int(steps), args.precision))
        )
        return
    report = {
        "benchmark": "attention",
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "openmp": openmp_env(),
        "mmap_threshold": kept,
        "model": {**MODEL, "text_len": TEXT_LEN, "text_bpe": TEXT_BPE, "image_vocab": IMAGE_VOCAB},
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "speed": [],
        "memory": [],
    }
    for spec in args.speed:
        grid, batch = (int(x) for x in spec.split("x"))
        report["speed"].append(speed(grid, batch, args.warmup, args.steps, args.precision))
        print(json.dumps(report["speed"][-1]), file=sys.stderr)  # progress
    for grid in args.memory:
        for attention in ("dense", "dalle"):
            row = memory(attention, grid, args.memory_batch, 2, args.threads, args.precision)
            report["memory"].append(row)
            print(json.dumps(report["memory"][-1]), file=sys.stderr)
    report["layer_memory"] = layer_memory(args.memory or [16, 32, 48], args.memory_batch)
    report["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
