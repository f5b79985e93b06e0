"""Training speed of the transformer: tokens/s and peak memory for a fixed configuration.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_training.py           # CPU, 2 threads
    python benchmarks/bench_training.py --device cuda --precision bf16

One training step = forward over the whole [<bos>, text, image] stream, DALL-E's
weighted loss (1/8 text, 7/8 image), backward, AdamW update (fused where the trainer
fuses it, :func:`dalle1.training.systems.fused_adamw`): what
``dalle1.training`` does per batch, without Lightning's bookkeeping. Random tokens:
the cost does not depend on the data. Under ``--precision bf16`` on a CPU the layers
take the attention kernels the trainer picks there (``set_flash_attention(model,
False)``). Prints one JSON document with the median step time over ``--steps`` steps
after ``--warmup`` steps.
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
    IMAGE_VOCAB,
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

from dalle1.config import TrainConfig  # noqa: E402
from dalle1.training.systems import fused_adamw, set_flash_attention  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--attention", default="dalle", choices=["dalle", "dense"])
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    device = setup(args.device, args.threads)

    model = build_model(args.grid, args.attention, device).train()
    if device.type == "cpu" and args.precision == "bf16":  # as the trainer does (systems.py)
        set_flash_attention(model, False)
    params = list(model.parameters())
    precision = "bf16-mixed" if args.precision == "bf16" else "32-true"
    fused = fused_adamw(TrainConfig(precision=precision), params)  # as the trainer picks
    opt = torch.optim.AdamW(params, lr=3e-4, fused=fused or None)
    g = torch.Generator().manual_seed(0)
    n_codes = args.grid * args.grid
    text = torch.randint(2, TEXT_VOCAB - TEXT_LEN, (args.batch, TEXT_LEN), generator=g)
    codes = torch.randint(0, IMAGE_VOCAB, (args.batch, n_codes), generator=g)
    text, codes = text.to(device), codes.to(device)

    def step() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
            loss, _ = model.loss(text, codes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    with PeakMemory(device) as mem:
        times = [timed(step, device) for _ in range(args.steps)]
    wall = median([t[0] for t in times])
    tokens = args.batch * (TEXT_LEN + n_codes)  # every stream position is predicted
    report = {
        "benchmark": "training",
        "device": str(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "openmp": openmp_env(),
        "model": model_info(args.attention),
        "parameters": sum(p.numel() for p in model.parameters()),
        "grid": args.grid,
        "batch": args.batch,
        "precision": args.precision,
        "tokens_per_step": tokens,
        "step_seconds": round(wall, 4),
        "step_cpu_seconds": round(median([t[1] for t in times]), 4),
        "tokens_per_s": round(tokens / wall, 1),
        "steps_timed": args.steps,
        **mem.report(),
        "adamw_step_ms": adamw_steps(model, device),
    }
    print(json.dumps(report, indent=2))


def adamw_steps(model: torch.nn.Module, device: torch.device, steps: int = 10) -> dict:
    """Milliseconds of one AdamW update of the model's parameters, per torch kernel:
    ``loop`` (one tensor at a time), ``foreach`` (torch's default), ``fused`` (the
    trainer's, where it fuses, :func:`dalle1.training.systems.fused_adamw`)."""
    params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    out = {}
    for name, kw in (
        ("loop", {"foreach": False}),
        ("foreach", {"foreach": True}),
        ("fused", {"fused": True}),
    ):
        opt = torch.optim.AdamW(params, lr=3e-4, **kw)
        for _ in range(3):
            opt.step()
        times = [timed(opt.step, device)[0] for _ in range(steps)]
        out[name] = round(median(times) * 1e3, 2)
    return out


if __name__ == "__main__":
    main()
