"""Two-process DDP on CPU (gloo) through Lightning: disjoint data per rank, identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dalle1.cli import main

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH = 3, 2

# Lightning's "ddp" strategy re-runs this script for rank 1 (its subprocess launcher),
# so it must be a file with a __main__ guard.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import lightning as L
    import torch
    from safetensors.torch import save_file

    from dalle1.config import load_config
    from dalle1.training import fit


    class Recorder(L.Callback):
        # every caption this rank trained on, and its parameters at the end
        def __init__(self, out):
            self.out, self.seen = Path(out), []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.seen.extend(batch[1])

        def on_train_end(self, trainer, module):
            rank = trainer.global_rank
            (self.out / f"seen_{rank}.json").write_text(json.dumps(self.seen))
            params = {k: p.detach().clone() for k, p in module.named_parameters()}
            save_file(params, str(self.out / f"weights_{rank}.safetensors"))


    if __name__ == "__main__":
        torch.set_num_threads(1)
        root, steps, batch = sys.argv[1:4]
        for fmt, data in zip(sys.argv[4::2], sys.argv[5::2]):  # one fit per format, same ranks
            out = Path(root) / fmt
            out.mkdir(exist_ok=True)
            overrides = [
                f"data.path={data}", f"data.format={fmt}", "data.synthetic_count=0",
                "data.val_fraction=0", f"data.batch_size={batch}", "data.shuffle_buffer=4",
                f"train.out_dir={out}/run", f"train.max_steps={steps}", "train.threads=1",
                "train.strategy=ddp", "train.devices=2", "train.accelerator=cpu",
            ]
            fit(load_config("configs/tiny_vae.yaml", overrides), callbacks=[Recorder(out)])
    """
)


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> Path:
    """16 random 16 px images with unique one-line captions ("item 0" …)."""
    root = tmp_path_factory.mktemp("ddp_items")
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"item {i}\n")
    return root


def test_two_rank_ddp_sees_disjoint_data_and_agrees(items, tmp_path):
    """Both a map dataset (Lightning's DistributedSampler) and shards (split by rank)."""
    shards = tmp_path / "shards"  # 4 shards of 4: each rank streams 2 of them
    assert main(["data", "shard", str(items), str(shards), "--shard-size", "4"]) == 0
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "MASTER_PORT"):
        env.pop(key, None)
    formats = {"webdataset": shards, "folder": items}
    args = [str(tmp_path), str(STEPS), str(BATCH)]
    args += [str(a) for pair in formats.items() for a in pair]
    run = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for fmt in formats:
        check_run(tmp_path / fmt)


def check_run(out: Path) -> None:
    seen = [json.loads((out / f"seen_{r}.json").read_text()) for r in range(2)]
    assert [len(s) for s in seen] == [STEPS * BATCH] * 2
    assert all(len(set(s)) == len(s) for s in seen)  # within one pass over each rank's part
    assert not set(seen[0]) & set(seen[1]), seen  # the ranks trained on different samples
    weights = [load_file(str(out / f"weights_{r}.safetensors")) for r in range(2)]
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name  # gradients were all-reduced
    assert (out / "run" / "model" / "vae" / "model.safetensors").is_file()  # rank 0 exported
