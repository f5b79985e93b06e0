"""FSDP2 on two CPU processes (gloo) through Lightning: sharded, resumed, equal to one process.

Two ranks train the tiny transformer with ``train.strategy: fsdp`` (dalle1's FSDP2 set-up
through Lightning's ModelParallelStrategy, :mod:`dalle1.training.sharding`): each rank
holds about half of every layer's parameters; the run stops after 2 of 4 steps, its
sharded checkpoint (one DCP file per rank) is resumed, and the exported model folder
equals the one a single process writes with the same global batch (within float
round-off: the ranks' gradients are averaged in another order). A third run checks
``bf16-mixed`` (bf16 gathers, float32 sharded master weights) with per-layer activation
checkpointing (each layer's forward runs again in backward).

What this cannot show on a CPU, and why: NCCL collectives and their overlap with compute
on CUDA streams (gloo runs them here, synchronously); bf16 tensor-core kernels and the
memory the sharding saves on a GPU (CPU kernels and host memory here); several nodes;
throughput and MFU (``benchmarks/gpu_check.py`` measures those on a GPU machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from dalle1.config import load_config
from dalle1.training import fit

ROOT = Path(__file__).resolve().parents[1]

# Lightning's launcher re-runs this script for rank 1, so it is a file with a __main__ guard.
SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path

    import lightning as L
    import torch

    from dalle1.config import load_config
    from dalle1.training import fit


    class Recorder(L.Callback):
        # what this rank holds, and the dtype layer 0's weights have inside its forward
        def __init__(self, out, name):
            self.out, self.name, self.forwards, self.compute = Path(out), name, 0, set()

        def on_fit_start(self, trainer, module):
            layer = module.dalle.layers[0]
            linear = next(m for m in layer.modules() if isinstance(m, torch.nn.Linear))
            layer.register_forward_pre_hook(self.count)
            linear.register_forward_pre_hook(lambda m, _: self.compute.add(str(m.weight.dtype)))

        def count(self, layer, args):
            # training forwards only: the validation passes (train.val_every) add their own
            self.forwards += int(layer.training)

        def on_train_end(self, trainer, module):
            params = list(module.dalle.parameters())
            info = {
                "local": sum(p.to_local().numel() for p in params),
                "total": sum(p.numel() for p in params),
                "layer_units": [type(layer).__name__ for layer in module.dalle.layers],
                "master": sorted({str(p.dtype) for p in params}),
                "compute": sorted(self.compute),
                "forwards": self.forwards,
                "steps": trainer.global_step,
            }
            (self.out / f"{self.name}_{trainer.global_rank}.json").write_text(json.dumps(info))


    def trainer_rank():
        return int(os.environ.get("LOCAL_RANK", "0"))


    class StopAt(L.Callback):  # a pre-empted job: stops cleanly after step 2 of 4
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                trainer.should_stop = True


    if __name__ == "__main__":
        torch.set_num_threads(1)
        out, vae, data = sys.argv[1:4]
        common = [
            f"data.path={data}", f"dalle.vae={vae}", "data.batch_size=2", "text.bpe_dropout=0",
            "dalle.p_uncond=0", "train.threads=1", "train.strategy=fsdp", "train.devices=2",
            "train.accelerator=cpu", "train.ckpt_every=2", "train.max_steps=4",
        ]

        def config(*extra):
            return load_config("configs/tiny_dalle.yaml", [*common, *extra])

        run = f"train.out_dir={out}/fsdp"
        fit(config(run), callbacks=[Recorder(out, "first"), StopAt()])
        fit(config(run), resume=True, callbacks=[Recorder(out, "resumed")])
        if trainer_rank() == 0:  # rank 1 runs ahead into the next run's out_dir: it must
            time.sleep(2)  # leave it to rank 0 to judge (no tokenizer.json written first)
        bf16 = ["train.precision=bf16-mixed", "train.activation_checkpointing=true"]
        fit(config(f"train.out_dir={out}/bf16", "train.max_steps=2", *bf16),
            callbacks=[Recorder(out, "bf16")])
    """
)


def test_two_rank_fsdp_shards_resumes_and_exports_what_one_process_does(
    tiny_model, shapes_dir, tmp_path
):
    vae = tiny_model.parent.parent / "vae" / "model"
    script = tmp_path / "fsdp_run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "MASTER_PORT"):
        env.pop(key, None)
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(vae), str(shapes_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    # the same 4 steps in one process: one batch of 4 = the two ranks' batches of 2
    single = load_config(
        "configs/tiny_dalle.yaml",
        [
            f"data.path={shapes_dir}",
            f"dalle.vae={vae}",
            "data.batch_size=4",
            "text.bpe_dropout=0",
            "dalle.p_uncond=0",
            "train.max_steps=4",
            "train.ckpt_every=2",
            f"train.out_dir={tmp_path / 'single'}",
        ],
    )
    fit(single)

    info = {
        (name, r): json.loads((tmp_path / f"{name}_{r}.json").read_text())
        for name in ("first", "resumed", "bf16")
        for r in (0, 1)
    }
    for (name, rank), i in info.items():
        # each layer one FSDP unit; each rank holds about half of the parameters
        assert set(i["layer_units"]) == {"FSDPLayer"}, i
        assert 0.45 < i["local"] / i["total"] < 0.55, (name, rank, i)
        assert i["master"] == ["torch.float32"]  # the sharded master weights stay float32
    assert info["first", 0]["local"] + info["first", 1]["local"] >= info["first", 0]["total"]
    assert info["first", 0]["steps"] == 2 and info["resumed", 0]["steps"] == 4
    assert info["first", 0]["compute"] == ["torch.float32"]
    # bf16-mixed: layer 0 computes with bf16 weights (gathered in bf16), and with activation
    # checkpointing its forward runs twice per step (forward, then again in backward)
    assert info["bf16", 0]["compute"] == ["torch.bfloat16"]
    assert info["bf16", 0]["forwards"] == 2 * info["bf16", 0]["steps"]
    assert info["first", 0]["forwards"] == info["first", 0]["steps"]

    # the checkpoint --resume read: a sharded DCP folder, one file per rank, written once
    # (last.ckpt links to the step's folder)
    last = tmp_path / "fsdp" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2
    assert last.is_symlink() and last.resolve().name == "epoch=0-step=4.ckpt"

    # the model folders: same parts, same tokenizer and VAE, weights equal within round-off
    a, b = tmp_path / "single" / "model", tmp_path / "fsdp" / "model"
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for part in ("tokenizer.json", "dalle/config.json", "vae/config.json"):
        assert (a / part).read_text() == (b / part).read_text(), part
    va, vb = (load_file(f / "vae" / "model.safetensors") for f in (a, b))
    assert va.keys() == vb.keys() and all(torch.equal(va[k], vb[k]) for k in va)  # untouched
    wa, wb = (load_file(f / "dalle" / "model.safetensors") for f in (a, b))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].dtype == wb[name].dtype == torch.float32
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-5, msg=name)
    ma, mb = (json.loads((f.parent / "metrics.json").read_text()) for f in (a, b))
    assert ma.keys() == mb.keys()
    for key in ma:
        assert abs(ma[key] - mb[key]) < 1e-4, key
