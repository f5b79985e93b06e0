"""Shared fixtures: a tiny captioned dataset and a tiny trained model folder (seconds on CPU)."""

from __future__ import annotations

import pytest
import torch

from dalle1.config import load_config
from dalle1.data import make_shapes_dataset
from dalle1.training import fit

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    return make_shapes_dataset(
        tmp_path_factory.mktemp("shapes"), count=48, image_size=16, seed=0, progress=False
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, shapes_dir):
    """Train the tiny VAE and transformer for a few steps; returns the transformer's model folder."""
    out = tmp_path_factory.mktemp("tiny")
    vae_cfg = load_config(
        "configs/tiny_vae.yaml", [f"data.path={shapes_dir}", f"train.out_dir={out / 'vae'}"]
    )
    vae_folder = fit(vae_cfg)
    dalle_cfg = load_config(
        "configs/tiny_dalle.yaml",
        [f"data.path={shapes_dir}", f"train.out_dir={out / 'dalle'}", f"dalle.vae={vae_folder}"],
    )
    return fit(dalle_cfg)
