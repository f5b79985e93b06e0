"""Crash safety: a run killed with SIGKILL and resumed ends bitwise equal to an uninterrupted one."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from dalle1.config import load_config
from dalle1.data import make_shapes_dataset
from dalle1.training import fit
from dalle1.training.resilience import safe_torch_load

REPO = Path(__file__).resolve().parents[1]


def overrides(data: Path, out: Path, steps: int, every: int, *extra: str) -> list[str]:
    return [
        f"data.path={data}",
        f"train.out_dir={out}",
        f"train.max_steps={steps}",
        f"train.ckpt_every={every}",
        "train.threads=1",
        "train.progress_bar=false",
        "data.val_fraction=0.1",
        *extra,
    ]


def train(data: Path, out: Path, steps: int, every: int, resume: bool = False):
    cmd = [sys.executable, "train.py", "--config", "configs/tiny_vae.yaml"]
    cmd += ["--resume"] if resume else []
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        cmd + overrides(data, out, steps, every),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = (
        load_file(a / "model/vae/model.safetensors"),
        load_file(b / "model/vae/model.safetensors"),
    )
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def losses(out: Path) -> dict[int, str]:
    rows = csv.DictReader(open(out / "logs" / "metrics.csv"))
    return {int(r["step"]): r["loss"] for r in rows if r.get("loss")}


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    data = make_shapes_dataset(tmp_path / "data", count=40, image_size=16, progress=False)
    steps, every = 60, 4
    ref = train(data, tmp_path / "ref", steps, every)  # uninterrupted, runs alongside
    victim = train(data, tmp_path / "run", steps, every)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)  # after the first checkpoint, mid-run
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, victim.stderr.read()
    assert not (tmp_path / "run" / "model").exists()  # it really died before the end
    killed_at = safe_torch_load(last)["global_step"]  # a complete file: atomic write
    assert every <= killed_at < steps and killed_at % every == 0

    resumed = train(data, tmp_path / "run", steps, every, resume=True)
    assert resumed.wait(timeout=180) == 0, resumed.stderr.read()
    assert ref.wait(timeout=180) == 0, ref.stderr.read()

    # bitwise-equal final weights, and the same loss at every step after the resume point
    assert_same_weights(tmp_path / "ref", tmp_path / "run")
    ref_loss, run_loss = losses(tmp_path / "ref"), losses(tmp_path / "run")
    after = [s for s in run_loss if s >= killed_at]
    assert len(after) >= steps - killed_at - 1
    assert all(run_loss[s] == ref_loss[s] for s in after)
    # the log survived the kill and the resume: every step exactly once, the losses of the
    # uninterrupted run (Lightning's own CSV logger would have deleted the first part)
    rows = list(csv.DictReader(open(tmp_path / "run" / "logs" / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r.get("loss")] == list(range(steps))
    assert run_loss == ref_loss
    # the final checkpoints agree on step count, optimizer moments and LR schedule position
    a = safe_torch_load(tmp_path / "ref" / "checkpoints" / "last.ckpt")
    b = safe_torch_load(last)
    assert a["global_step"] == b["global_step"] == steps
    assert a["lr_schedulers"] == b["lr_schedulers"]
    for sa, sb in zip(
        a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()
    ):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


class Crash(L.Callback):
    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize(
    "crash_at, extra",
    [
        (13, []),  # checkpoint at step 12 = the last batch of an epoch (4 batches per epoch)
        (10, ["data.num_workers=2"]),  # mid-epoch, images decoded in worker processes
    ],
)
def test_resume_in_process_matches(tmp_path, shapes_dir, crash_at, extra):
    def cfg(out):
        return load_config(
            "configs/tiny_vae.yaml",
            overrides(shapes_dir, out, 16, 3, "data.batch_size=10", *extra),
        )

    fit(cfg(tmp_path / "ref"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(cfg(tmp_path / "run"), callbacks=[Crash(crash_at)])
    assert safe_torch_load(tmp_path / "run/checkpoints/last.ckpt")["global_step"] == crash_at - 1
    fit(cfg(tmp_path / "run"), resume=True)
    assert_same_weights(tmp_path / "ref", tmp_path / "run")


def test_resume_transformer_stage(tmp_path, tiny_model, shapes_dir):
    """The transformer stage resumes exactly too (BPE dropout off: its RNG lives in Rust)."""
    vae = tiny_model.parent.parent / "vae" / "model"

    def cfg(out):
        return load_config(
            "configs/tiny_dalle.yaml",
            [
                f"data.path={shapes_dir}",
                f"train.out_dir={out}",
                f"dalle.vae={vae}",
                "train.max_steps=8",
                "train.ckpt_every=3",
                "text.bpe_dropout=0",
            ],
        )

    fit(cfg(tmp_path / "ref"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(cfg(tmp_path / "run"), callbacks=[Crash(5)])
    fit(cfg(tmp_path / "run"), resume=True)
    wa = load_file(tmp_path / "ref/model/dalle/model.safetensors")
    wb = load_file(tmp_path / "run/model/dalle/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
