"""``train.precision: auto``: which precision a run trains in, and that the trainer gets it."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from dalle1.config import Config, TrainConfig, load_config
from dalle1.training import fit
from dalle1.training import precision as P


@pytest.mark.parametrize(
    "precision, stage, dim, device, bf16, expected",
    [
        ("32-true", "dalle", 512, "cuda", True, "32-true"),  # an explicit value is kept
        ("16-mixed", "vae", 64, "cpu", False, "16-mixed"),
        ("auto", "vae", 64, "cuda", True, "bf16-mixed"),  # every stage on a bf16 GPU
        ("auto", "clip", 64, "cuda", True, "bf16-mixed"),
        ("auto", "dalle", 32, "cuda", True, "bf16-mixed"),
        ("auto", "dalle", 512, "cuda", False, "32-true"),  # a GPU without bf16
        ("auto", "dalle", 128, "cpu", True, "bf16-mixed"),  # the transformer on an AMX CPU
        ("auto", "dalle", 127, "cpu", True, "32-true"),  # narrower: the casts cost more
        ("auto", "vae", 512, "cpu", True, "32-true"),  # convolutions: slower in bf16 on a CPU
        ("auto", "clip", 512, "cpu", True, "32-true"),
        ("auto", "dalle", 512, "cpu", False, "32-true"),  # no bf16 instructions
        ("auto", "dalle", 512, "mps", True, "32-true"),
    ],
)
def test_choose_precision(precision, stage, dim, device, bf16, expected):
    assert P.choose_precision(precision, stage, dim, device, bf16) == expected


def test_training_device(monkeypatch):
    assert P.training_device("cpu") == "cpu"
    assert P.training_device("gpu") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert P.training_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert P.training_device("auto") == "cuda"


def test_resolve_precision_replaces_only_auto(monkeypatch):
    assert TrainConfig().precision == "auto"  # the default
    monkeypatch.setattr(P, "native_bf16", lambda device: device == "cpu")
    config = Config()
    config.train.stage, config.train.accelerator, config.dalle.dim = "dalle", "cpu", 256
    resolved = P.resolve_precision(config)
    assert resolved.train.precision == "bf16-mixed"
    assert config.train.precision == "auto"  # the caller's config is not changed
    assert resolved.dalle == config.dalle and resolved.train.lr == config.train.lr
    config.train.precision = "32-true"
    assert P.resolve_precision(config).train.precision == "32-true"


class _Seen(L.Callback):
    def __init__(self):
        self.precision = None

    def on_train_start(self, trainer, module):
        self.precision = trainer.precision


def test_fit_trains_in_the_resolved_precision(
    tmp_path, tiny_model, shapes_dir, monkeypatch, capsys
):
    """The VAE stage stays float32 on a CPU; the transformer stage at width 128 trains under
    bf16 autocast on a CPU with bf16 instructions (pretended here, for any CI machine)."""
    monkeypatch.setattr(P, "native_bf16", lambda device: True)
    common = [f"data.path={shapes_dir}", "train.max_steps=2", "train.val_every=0"]
    vae_seen = _Seen()
    vae_cfg = load_config("configs/tiny_vae.yaml", [*common, f"train.out_dir={tmp_path / 'v'}"])
    fit(vae_cfg, callbacks=[vae_seen])
    assert vae_seen.precision == "32-true"
    assert "train.precision auto -> 32-true" in capsys.readouterr().out
    dalle_seen = _Seen()
    vae_folder = tiny_model.parent.parent / "vae" / "model"
    dalle_cfg = load_config(
        "configs/tiny_dalle.yaml",
        [
            *common,
            f"train.out_dir={tmp_path / 'd'}",
            f"dalle.vae={vae_folder}",
            "dalle.dim=128",
            "dalle.heads=2",
            "dalle.dim_head=64",
            "sample.sweep={}",
            "sample.candidates=[1]",
        ],
    )
    fit(dalle_cfg, callbacks=[dalle_seen])
    assert dalle_seen.precision == "bf16-mixed"
    assert "train.precision auto -> bf16-mixed" in capsys.readouterr().out
