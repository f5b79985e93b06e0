"""GPU check, under 5 minutes on one machine: training MFU, FSDP, cached decoding vs HBM.

    python benchmarks/gpu_check.py                      # on a GPU machine
    python benchmarks/gpu_check.py --out gpu_check.json  # also write the JSON to a file
    OMP_WAIT_POLICY=PASSIVE python benchmarks/gpu_check.py --dry-run   # CPU, tiny shape

Three parts, one JSON document:

1. ``train``: bf16 training steps (forward, DALL-E's loss, backward, AdamW) at the paper's
   1280-token stream (256 text + 32 x 32 codes), for dense causal attention and for the
   ``dalle`` sparse masks: step time, tokens/s and model FLOPs utilisation, from the
   FLOP count ``dalle1 plan`` uses (:func:`dalle1.planning.train_flops_per_token`).
2. ``fsdp``: the same model through Lightning and dalle1's FSDP2 set-up
   (``train.strategy: fsdp``: one unit per layer, bf16 gathers, activation checkpointing)
   on every GPU present: tokens/s, MFU, the parameters each rank holds, peak memory. It
   runs as its own process (``--only fsdp``) so that Lightning's launcher, which starts
   one process per GPU by re-running that command, repeats nothing else.
3. ``decode``: cached sampling (greedy) with the weights cast to bf16 once, a batch of
   images: image tokens/s and the fraction of the HBM bound
   (:func:`dalle1.planning.decode_tokens_per_second`) it reaches, counting every cached
   key, and counting only the keys the masks allow.

``--dry-run`` runs all three on the CPU at a tiny shape (seconds; the test suite does):
it checks that the script works, its figures mean nothing. As written, this script has
not yet been run on a GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first torch import

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dalle1.config import Config, DALLEConfig, TrainConfig  # noqa: E402
from dalle1.planning import (  # noqa: E402
    GPUS,
    decode_bytes_per_step,
    device_peak_flops,
    train_flops_per_token,
)
from dalle1.sampling import sample_codes  # noqa: E402
from dalle1.transformer import StreamShape  # noqa: E402

# the paper's stream (256 text tokens + 32 x 32 codes, vocabularies 16384 + 256 and 8192)
PAPER_STREAM = dict(text_len=256, grid=32, text_vocab=16384 + 256, image_vocab=8192)
TINY_STREAM = dict(text_len=8, grid=4, text_vocab=64 + 8, image_vocab=64)
TINY_MODEL = dict(dim=64, depth=2, heads=2, dim_head=32)


def shape_of(stream: dict) -> StreamShape:
    return StreamShape(
        stream["text_vocab"], stream["text_len"], stream["image_vocab"], stream["grid"], 1
    )


def batch_of(shape: StreamShape, batch: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    bpe = shape.text_vocab - shape.text_len
    text = torch.randint(2, bpe, (batch, shape.text_len), generator=g).to(device)
    codes = torch.randint(0, shape.image_vocab, (batch, shape.num_codes), generator=g).to(device)
    return text, codes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# --- 1. training steps -------------------------------------------------------------------


def train_check(args, device: torch.device, attention: str) -> dict:
    from dalle1.training.sharding import build_dalle  # Lightning: only where training is timed

    cfg = DALLEConfig(**args.model, attention=attention)
    shape = shape_of(args.stream)
    model = build_dalle(cfg, shape, device, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    text, codes = batch_of(shape, args.batch, device)
    times = []
    for step in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = model.loss(text, codes)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    tokens = args.batch * (shape.text_len + shape.num_codes)
    peak, source = device_peak_flops(device, "bf16-mixed")
    per_token = train_flops_per_token(model)
    result = {
        "attention": attention,
        "batch": args.batch,
        "stream": shape.text_len + shape.num_codes,
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_s_median": step_s,
        "tokens_per_s": tokens / step_s,
        "flops_per_token": per_token,
        "peak_flops": peak,
        "peak_source": source,
        "mfu": tokens / step_s * per_token / peak,
        "loss": float(loss.detach()),
    }
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        torch.cuda.reset_peak_memory_stats(device)
    del model, opt
    return result


# --- 2. FSDP through Lightning -------------------------------------------------------------


def fsdp_check(args, device_type: str) -> dict | None:
    """Runs in its own process (``--only fsdp``); Lightning starts one per device."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from dalle1.training.sharding import ShardedDataParallel
    from dalle1.training.systems import DALLEModule
    from dalle1.training.throughput import ThroughputCallback

    shape = shape_of(args.stream)
    devices = torch.cuda.device_count() if device_type == "cuda" else 1
    config = Config(
        dalle=DALLEConfig(**args.model, attention="dalle"),
        train=TrainConfig(
            stage="dalle",
            max_steps=args.warmup + args.steps,
            warmup_steps=1,
            precision="bf16-mixed",
            strategy="fsdp",
            activation_checkpointing=True,
            log_every=args.steps,
        ),
    )
    text, codes = batch_of(shape, args.batch * devices * (args.warmup + args.steps), "cpu")
    data = DataLoader(TensorDataset(text, codes), batch_size=args.batch)

    class Measure(L.Callback):
        def __init__(self):
            self.times, self.result = [], None

        def on_train_batch_start(self, trainer, module, batch, i):
            sync(module.device)
            self.times.append(time.perf_counter())

        def on_train_end(self, trainer, module):
            sync(module.device)
            self.times.append(time.perf_counter())
            steps = self.times[args.warmup :]
            step_s = (steps[-1] - steps[0]) / (len(steps) - 1)
            model = module.dalle
            local = sum(p.to_local().numel() for p in model.parameters())
            total = sum(p.numel() for p in model.parameters())
            tokens = args.batch * (shape.text_len + shape.num_codes) * trainer.world_size
            peak = throughput.peak_flops
            self.result = {
                "devices": trainer.world_size,
                "gpu": gpu_name(module.device),
                "batch_per_device": args.batch,
                "activation_checkpointing": True,
                "step_s": step_s,
                "tokens_per_s": tokens / step_s,
                "mfu": tokens / step_s * throughput.flops_per_token / (peak * trainer.world_size),
                "parameters": total,
                "parameters_on_rank0": local,
                "peak_memory_gb_rank0": (
                    torch.cuda.max_memory_allocated(module.device) / 1e9
                    if module.device.type == "cuda"
                    else None
                ),
            }

    measure, throughput = Measure(), ThroughputCallback(window=args.steps)
    trainer = L.Trainer(
        accelerator=device_type,
        devices=devices,
        strategy=ShardedDataParallel(),
        precision="bf16-mixed",
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[measure, throughput],
    )
    null_text = torch.arange(shape.text_len) + shape.text_vocab - shape.text_len
    trainer.fit(DALLEModule(config, shape, null_text), data)
    return measure.result if trainer.is_global_zero else None


def run_fsdp_process(args) -> dict:
    """``--only fsdp`` in a child process; its last stdout line is the JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", "fsdp", *args.passthrough]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.fsdp_timeout)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode != 0 or not lines:
        return {"error": f"exit {run.returncode}", "stderr_tail": run.stderr[-2000:]}
    return json.loads(lines[-1])


# --- 3. cached decoding ----------------------------------------------------------------------


def decode_check(args, device: torch.device) -> dict:
    from dalle1.training.sharding import build_dalle

    cfg = DALLEConfig(**{**args.model, "depth": args.decode_depth}, attention="dalle")
    shape = shape_of(args.stream)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_dalle(cfg, shape, device, seed=0).eval().to(dtype)  # cast once
    text, _ = batch_of(shape, args.decode_batch, device)
    sample_codes(model, text[:2], temperature=0.0)  # warm-up (kernels, allocator)
    sync(device)
    start = time.perf_counter()
    codes = sample_codes(model, text, temperature=0.0)
    sync(device)
    seconds = time.perf_counter() - start
    tokens_per_s = codes.numel() / seconds
    bandwidth = hbm_bandwidth(device)
    result = {
        "batch": args.decode_batch,
        "depth": args.decode_depth,
        "weights_dtype": str(dtype),
        "seconds_per_batch": seconds,
        "image_tokens_per_s": tokens_per_s,
        "hbm_bandwidth": bandwidth,
    }
    for keys, sparse in (("all_keys", False), ("mask_keys", True)):
        step_bytes = decode_bytes_per_step(
            model, args.decode_batch, sparse, weight_bytes=torch.finfo(dtype).bits // 8
        )
        bound = args.decode_batch / (step_bytes / bandwidth) if bandwidth else None
        result[f"bound_tokens_per_s_{keys}"] = bound
        result[f"fraction_of_bound_{keys}"] = tokens_per_s / bound if bound else None
    return result


def hbm_bandwidth(device: torch.device) -> float | None:
    """Datasheet HBM bandwidth of a known GPU (bytes/s); None for anything else."""
    if device.type != "cuda":
        return None
    name = gpu_name(device).lower()
    return next((gpu.hbm_bandwidth for key, gpu in GPUS.items() if key in name), None)


# --- main ------------------------------------------------------------------------------------


def without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE`` (for the ``--only fsdp`` child)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            kept.append(arg)
    return kept


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shape: check the script")
    ap.add_argument("--only", choices=("train", "fsdp", "decode"), default=None)
    ap.add_argument("--dim", type=int, default=2048, help="model width for parts 1 and 2")
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dim-head", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="training samples per GPU")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--decode-depth", type=int, default=16, help="layers of the decode model")
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--fsdp-timeout", type=int, default=240)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    args.passthrough = without_option(list(sys.argv[1:] if argv is None else argv), "--only")
    if args.dry_run:
        args.stream, args.model = TINY_STREAM, dict(TINY_MODEL)
        args.batch, args.warmup, args.steps = 2, 1, 2
        args.decode_depth, args.decode_batch = 2, 2
    else:
        args.stream = PAPER_STREAM
        args.model = dict(dim=args.dim, depth=args.depth, heads=args.heads, dim_head=args.dim_head)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device_type = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    if device_type == "cpu" and not args.dry_run:
        raise SystemExit("no CUDA device: run with --dry-run to check the script on the CPU")
    if device_type == "cpu":
        torch.set_num_threads(2)
    device = torch.device(device_type)
    if args.only == "fsdp":
        result = fsdp_check(args, device_type)
        if result is not None:
            print(json.dumps(result))
        return
    start = time.perf_counter()
    report: dict = {
        "dry_run": args.dry_run,
        "device": gpu_name(device),
        "torch": torch.__version__,
        "model": args.model,
        "stream": args.stream,
    }
    if args.only in (None, "train"):
        report["train"] = [train_check(args, device, a) for a in ("dense", "dalle")]
    if args.only in (None, "fsdp"):
        report["fsdp"] = run_fsdp_process(args)
    if args.only in (None, "decode"):
        report["decode"] = decode_check(args, device)
    report["wall_s"] = time.perf_counter() - start
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
