"""The demo's two training steps (configs/demo_*.yaml), precision variants side by side.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_demo_training.py          # 2 threads

One step = forward, the stage's loss, backward, AdamW update, on the demo's model and
batch shapes (random data: the cost does not depend on it), without Lightning. The
variants of a stage run interleaved (A B C, C B A, ...) so that they see the same machine
load, and every figure is a median; ``speedup`` is the median over steps of the paired
ratio float32-step / variant-step, in wall and in process CPU time. Prints one JSON
document. Variants:

* transformer: ``fp32``; ``bf16`` (bf16 autocast, x-transformers' flash attention, as
  Lightning's ``bf16-mixed`` alone gives); ``bf16+plain_attention`` (what ``make demo``
  runs: bf16 autocast with the layers' matmul + softmax attention,
  :func:`dalle1.training.systems.set_flash_attention`); ``fp32+fused_adamw``;
* VAE: ``fp32``; ``bf16``; ``fp32+channels_last``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first torch import

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dalle1.config import load_config  # noqa: E402
from dalle1.training.systems import set_flash_attention  # noqa: E402
from dalle1.transformer import DALLE, StreamShape  # noqa: E402
from dalle1.vae import DiscreteVAE  # noqa: E402


def transformer_variants(cfg) -> dict:
    d = cfg.data
    vae = load_config(ROOT / "configs" / "demo_vae.yaml").vae  # the codes' vocabulary and grid
    text_len, grid = cfg.text.text_len, vae.image_size // 2**vae.num_downsamples
    shape = StreamShape(cfg.text.vocab_size + text_len, text_len, vae.codebook_size, grid, 1)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(2, cfg.text.vocab_size, (d.batch_size, text_len), generator=g)
    codes = torch.randint(0, vae.codebook_size, (d.batch_size, grid * grid), generator=g)
    out = {}
    for name, bf16, plain, fused in [
        ("fp32", False, False, False),
        ("bf16", True, False, False),
        ("bf16+plain_attention", True, True, False),
        ("fp32+fused_adamw", False, False, True),
    ]:
        torch.manual_seed(0)
        model = DALLE(cfg.dalle, shape).train()
        set_flash_attention(model, not plain)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused or None)
        out[name] = (model, opt, bf16, lambda m, i: m.loss(text, codes)[0])
    return out


def vae_variants(cfg) -> dict:
    d = cfg.data
    images = torch.rand(d.batch_size, 3, d.image_size, d.image_size)
    out = {}
    for name, bf16, last in [
        ("fp32", False, False),
        ("bf16", True, False),
        ("fp32+channels_last", False, True),
    ]:
        torch.manual_seed(0)
        model = DiscreteVAE(cfg.vae).train()
        x = images
        if last:
            model = model.to(memory_format=torch.channels_last)
            x = images.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        out[name] = (model, opt, bf16, lambda m, i, x=x: m(x, i)[0])
    return out


def run(variants: dict, steps: int, warmup: int) -> dict:
    def step(v, i):
        model, opt, bf16, loss_of = v
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = loss_of(model, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    for v in variants.values():
        for i in range(warmup):
            step(v, i)
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    loss = {}
    names = list(variants)
    for i in range(steps):
        for k in names if i % 2 == 0 else names[::-1]:
            w, c = time.perf_counter(), time.process_time()
            loss[k] = step(variants[k], warmup + i)
            wall[k].append(time.perf_counter() - w)
            cpu[k].append(time.process_time() - c)

    def paired(xs, base):
        return round(statistics.median([b / x for x, b in zip(xs, base)]), 2)

    return {
        k: {
            "step_ms": round(statistics.median(wall[k]) * 1e3, 1),
            "step_cpu_ms": round(statistics.median(cpu[k]) * 1e3, 1),
            "speedup": {"wall": paired(wall[k], wall["fp32"]), "cpu": paired(cpu[k], cpu["fp32"])},
            "loss_after": round(loss[k], 4),
        }
        for k in variants
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_cfg = load_config(ROOT / "configs" / "demo_dalle.yaml")
    v_cfg = load_config(ROOT / "configs" / "demo_vae.yaml")
    report = {
        "benchmark": "demo training steps",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_start": os.getloadavg(),
        "transformer": run(transformer_variants(t_cfg), args.steps, args.warmup),
        "vae": run(vae_variants(v_cfg), args.steps, args.warmup),
        "load_average_end": os.getloadavg(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
