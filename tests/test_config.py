from pathlib import Path

import pytest

from dalle1.config import Config, ConfigError, load_config

CONFIGS = sorted(Path("configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {
        "demo_vae.yaml",
        "demo_dalle.yaml",
        "tiny_vae.yaml",
        "tiny_dalle.yaml",
        "paper_dalle.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_every_key_is_commented(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in line, f"{path.name}: key without a comment: {line!r}"


def test_paper_numbers():
    cfg = load_config("configs/paper_dalle.yaml")
    assert (cfg.dalle.depth, cfg.dalle.heads, cfg.dalle.dim_head) == (64, 62, 64)
    assert (cfg.text.vocab_size, cfg.text.text_len, cfg.vae.codebook_size) == (16384, 256, 8192)
    assert cfg.vae.image_size // 2**cfg.vae.num_downsamples == 32
    assert cfg.dalle.text_loss_weight == 0.125 and cfg.dalle.attention == "dalle"


def test_overrides_and_errors(tmp_path):
    cfg = load_config("configs/tiny_vae.yaml", ["train.max_steps=7", "vae.quantizer=vq"])
    assert cfg.train.max_steps == 7
    with pytest.raises(ConfigError, match="unknown key 'train.max_step'.*max_steps"):
        load_config("configs/tiny_vae.yaml", ["train.max_step=7"])
    with pytest.raises(ConfigError, match="train.lr: expected float, got str"):
        load_config("configs/tiny_vae.yaml", ["train.lr=fast"])
    with pytest.raises(ConfigError, match="vae.quantizer"):
        load_config("configs/tiny_vae.yaml", ["vae.quantizer=kmeans"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("vae: {codebook_sise: 3}\n")
    with pytest.raises(ConfigError, match="codebook_sise"):
        load_config(bad)
