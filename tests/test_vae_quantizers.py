"""The three quantizers (gumbel, vq, fsq), their schedules, and the logit-Laplace likelihood."""

import copy
import json
import math

import pytest
import torch

from dalle1.checkpoint import save_vae
from dalle1.cli import main
from dalle1.config import ConfigError, VAEConfig, fsq_levels_for, load_config
from dalle1.vae import (
    QUANTIZERS,
    DiscreteVAE,
    beta_at,
    logit_laplace_nll,
    map_pixels,
    output_to_image,
    reconstruction_loss,
    tau_at,
)


def tiny_cfg(quantizer: str, **kw) -> VAEConfig:
    base = dict(
        image_size=16,
        hidden_dim=8,
        num_downsamples=2,
        codebook_size=64,
        codebook_dim=8,
        quantizer=quantizer,
    )
    return VAEConfig(**{**base, **kw})


# --- schedules ---------------------------------------------------------------------------


def test_tau_schedule_hits_its_endpoints_and_decreases():
    cfg = VAEConfig(gumbel_tau_start=1.0, gumbel_tau_end=1 / 16, gumbel_tau_steps=1000)
    assert tau_at(0, cfg) == 1.0
    assert tau_at(1000, cfg) == pytest.approx(1 / 16, abs=1e-12)
    assert tau_at(50_000, cfg) == pytest.approx(1 / 16, abs=1e-12)  # stays at the end
    assert tau_at(500, cfg) == pytest.approx((1 + 1 / 16) / 2)  # cosine: halfway at mid-point
    values = [tau_at(s, cfg) for s in range(0, 1001, 50)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_beta_schedule_ramps_from_zero_to_the_kl_weight():
    cfg = VAEConfig(gumbel_kl_weight=6.6, gumbel_kl_steps=5000)
    assert beta_at(0, cfg) == 0.0
    assert beta_at(5000, cfg) == pytest.approx(6.6)
    assert beta_at(10**6, cfg) == pytest.approx(6.6)
    assert beta_at(2500, cfg) == pytest.approx(3.3)
    assert 0 < beta_at(100, cfg) < beta_at(4900, cfg) < 6.6
    # zero-length schedules are at their end from the first step
    cfg0 = VAEConfig(gumbel_kl_steps=0, gumbel_tau_steps=0)
    assert beta_at(0, cfg0) == cfg0.gumbel_kl_weight and tau_at(0, cfg0) == cfg0.gumbel_tau_end


# --- logit-Laplace -------------------------------------------------------------------------


def test_logit_laplace_matches_a_hand_computation():
    eps = 0.1
    pixels = torch.tensor([0.0, 0.5, 1.0, 0.25]).view(1, 1, 2, 2)
    mu = torch.tensor([0.0, 0.3, 1.5, -1.0]).view(1, 1, 2, 2)
    log_b = torch.tensor([0.0, -0.5, 0.2, -1.0]).view(1, 1, 2, 2)
    got = logit_laplace_nll(torch.cat([mu, log_b], 1), pixels, eps).item()
    total = 0.0
    for p, m, lb in zip([0.0, 0.5, 1.0, 0.25], [0.0, 0.3, 1.5, -1.0], [0.0, -0.5, 0.2, -1.0]):
        x = (1 - 2 * eps) * p + eps
        b = math.exp(lb)
        density = math.exp(-abs(math.log(x / (1 - x)) - m) / b) / (2 * b * x * (1 - x))
        total += -math.log(density)
    assert got == pytest.approx(total / 4, rel=1e-5)


def test_logit_laplace_is_a_density_on_the_unit_interval():
    # eps = 0 maps pixels to themselves; integrate exp(-nll) over (0, 1) in logit space:
    # dx = sigmoid(u) (1 - sigmoid(u)) du
    u = torch.linspace(-20, 20, 801, dtype=torch.float64)
    x = torch.sigmoid(u)
    for mu, log_b in [(0.0, 0.0), (1.2, -0.7), (-2.0, 0.5)]:
        params = torch.tensor([mu, log_b], dtype=torch.float64).view(1, 2, 1, 1)
        nll = torch.stack([logit_laplace_nll(params, xi.view(1, 1, 1, 1), eps=0.0) for xi in x])
        assert torch.isfinite(nll).all()
        mass = torch.trapezoid(torch.exp(-nll) * x * (1 - x), u).item()
        assert mass == pytest.approx(1.0, abs=1e-3)


def test_logit_laplace_is_finite_at_extreme_pixels_and_falls_as_the_reconstruction_improves():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 8)
    images[0, 0, 0, 0], images[0, 0, 0, 1] = 0.0, 1.0
    x = map_pixels(images, 0.1)
    target_mu = torch.log(x / (1 - x))
    noise = torch.randn_like(target_mu)
    log_b = torch.full_like(target_mu, -1.0)
    losses = []
    for err in [2.0, 1.0, 0.5, 0.1, 0.0]:
        out = torch.cat([target_mu + err * noise, log_b], 1)
        loss = reconstruction_loss(out, images, "logit_laplace", eps=0.1)
        assert torch.isfinite(loss)
        losses.append(loss.item())
    assert all(a > b for a, b in zip(losses, losses[1:]))
    # a sharper scale is better once the location is right
    sharp = reconstruction_loss(torch.cat([target_mu, log_b - 2], 1), images, "logit_laplace")
    assert sharp.item() < losses[-1]
    # the image is the median sigmoid(mu), mapped back from [eps, 1 - eps]
    cfg = VAEConfig(recon_loss="logit_laplace", logit_laplace_eps=0.1)
    back = output_to_image(torch.cat([target_mu, log_b], 1), cfg)
    assert torch.allclose(back, images, atol=1e-5)


def test_logit_laplace_needs_six_channels():
    with pytest.raises(ValueError, match="6 decoder channels"):
        logit_laplace_nll(torch.zeros(1, 3, 4, 4), torch.rand(1, 3, 4, 4))
    vae = DiscreteVAE(tiny_cfg("vq", recon_loss="logit_laplace"))
    assert vae.decoder.net[-1].out_channels == 6


# --- every quantizer -------------------------------------------------------------------------


@pytest.mark.parametrize("quantizer", sorted(QUANTIZERS))
def test_round_trip_shapes_codes_in_range_and_encode_leaves_state_unchanged(quantizer):
    torch.manual_seed(0)
    vae = DiscreteVAE(tiny_cfg(quantizer))
    images = torch.rand(4, 3, 16, 16)
    vae.train()
    loss, logs = vae(images, step=3)  # first pass: vq's k-means initialisation
    loss.backward()
    before = copy.deepcopy(vae.state_dict())
    codes = vae.encode(images)
    for _ in range(2):
        assert torch.equal(vae.encode(images), codes)
    for key, value in vae.state_dict().items():
        assert torch.equal(value, before[key]), f"{quantizer}: encode changed {key}"
    assert vae.training
    assert codes.shape == (4, 16) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 64
    assert logs["codes"].shape == (4, 16)
    out = vae.decode(codes)
    assert out.shape == (4, 3, 16, 16) and 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_decode_uses_the_same_vectors_as_the_training_pass(quantizer):
    torch.manual_seed(0)
    vae = DiscreteVAE(tiny_cfg(quantizer))
    images = torch.rand(4, 3, 16, 16)
    vae.train()
    vae(images)
    vae.eval()
    z = vae.encoder(images * 2 - 1)
    quantized, indices, _, _ = vae.quantizer(z)
    assert torch.equal(indices, vae.encode(images))
    assert torch.allclose(quantized, vae.quantizer.embed(indices, vae.grid_size), atol=1e-5)


def test_gumbel_codes_are_the_argmax_and_the_kl_term_follows_beta():
    torch.manual_seed(0)
    cfg = tiny_cfg("gumbel", gumbel_kl_weight=6.6, gumbel_kl_steps=10)
    vae = DiscreteVAE(cfg)
    images = torch.rand(2, 3, 16, 16)
    logits = vae.encoder(images * 2 - 1)
    assert logits.shape == (2, 64, 4, 4)
    assert torch.equal(vae.encode(images), logits.argmax(1).flatten(1))
    _, _, aux0, stats0 = vae.quantizer(logits, step=0)
    assert aux0.item() == 0.0 and stats0["beta"] == 0.0 and stats0["tau"] == 1.0
    _, _, aux, stats = vae.quantizer(logits, step=10)
    assert stats["beta"] == pytest.approx(6.6) and aux.item() == pytest.approx(6.6 * stats["kl"])
    # uniform logits: q is the prior, the KL vanishes
    _, _, _, flat = vae.quantizer(torch.zeros_like(logits), step=10)
    assert flat["kl"] == pytest.approx(0.0, abs=1e-7)
    # the KL to the uniform prior is at most log K per cell (per pixel value after scaling)
    cells, pixels = 16, 3 * 16 * 16
    assert stats["kl"] <= math.log(64) * cells / pixels + 1e-6


def test_gumbel_straight_through_is_hard_forward_and_soft_backward():
    torch.manual_seed(0)
    vae = DiscreteVAE(tiny_cfg("gumbel", gumbel_straight_through=True))
    logits = torch.randn(2, 64, 4, 4, requires_grad=True)
    quantized, _, _, _ = vae.quantizer(logits, step=0)
    rows = vae.quantizer.codebook.weight  # every vector is exactly one codebook row
    vectors = quantized.detach().permute(0, 2, 3, 1).reshape(-1, 8)
    distances = (vectors[:, None] - rows.detach()[None]).norm(dim=-1)
    assert distances.min(1).values.max() < 1e-5
    quantized.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_gumbel_logit_laplace_training_reduces_the_loss():
    torch.manual_seed(0)
    vae = DiscreteVAE(
        tiny_cfg("gumbel", recon_loss="logit_laplace", gumbel_kl_steps=5, gumbel_tau_steps=29)
    )
    images = torch.rand(4, 3, 16, 16).round()  # two-colour images: easy to reconstruct
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    first = None
    for step in range(30):
        loss, logs = vae(images, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else logs["recon_loss"].item()
    assert logs["recon_loss"].item() < first - 0.1
    assert torch.isfinite(loss) and logs["tau"].item() == pytest.approx(1 / 16)


# --- FSQ levels ----------------------------------------------------------------------------


def test_fsq_levels_multiply_to_the_codebook_size():
    assert fsq_levels_for(256) == [8, 8, 4]
    assert fsq_levels_for(512) == [8, 8, 8]
    assert fsq_levels_for(1000) == [8, 5, 5, 5]
    assert fsq_levels_for(8192) == [8, 8, 8, 4, 4]
    for size in [27, 64, 100, 128, 240, 1024, 4096, 16384]:
        levels = fsq_levels_for(size)
        assert math.prod(levels) == size and all(3 <= level <= 8 for level in levels)
    vae = DiscreteVAE(tiny_cfg("fsq", codebook_size=240))
    assert vae.quantizer.levels == [8, 6, 5]


def test_fsq_sizes_without_levels_fail_with_a_clear_error():
    with pytest.raises(ValueError, match="codebook_size=257"):
        fsq_levels_for(257)
    with pytest.raises(ValueError, match=r"imply 125 codes but vae.codebook_size=64"):
        DiscreteVAE(tiny_cfg("fsq", fsq_levels=[5, 5, 5]))
    with pytest.raises(ConfigError, match="codebook_size=257"):
        load_config(None, ["vae.quantizer=fsq", "vae.codebook_size=257"])
    assert load_config(None, ["vae.quantizer=vq", "vae.codebook_size=257"])  # only fsq cares


# --- eval-vae ------------------------------------------------------------------------------


def test_eval_vae_prints_metrics_and_writes_a_grid(shapes_dir, tmp_path, capsys):
    torch.manual_seed(0)
    vae = DiscreteVAE(tiny_cfg("gumbel", recon_loss="logit_laplace")).eval()
    save_vae(vae, tmp_path / "model" / "vae")
    out = tmp_path / "eval"
    argv = ["--model", str(tmp_path / "model"), "--data", str(shapes_dir), "--out", str(out)]
    assert main([*argv, "--limit", "20"], command_name="eval-vae") == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed) == {"psnr", "mse", "usage", "perplexity", "images"}
    assert printed["images"] == 20
    assert printed["psnr"] == pytest.approx(-10 * math.log10(printed["mse"]), rel=1e-6)
    assert 0 < printed["usage"] <= 1 and printed["perplexity"] >= 1
    assert json.loads((out / "metrics.json").read_text()) == printed
    from PIL import Image

    with Image.open(out / "recon.png") as grid:  # 2 rows of 8 images of 16 px, scaled by 2
        assert grid.height > 2 * 2 * 16 and grid.width > 8 * 2 * 16
    assert main(["--model", str(tmp_path / "nope"), "--data", str(shapes_dir)], "eval-vae") == 2


@pytest.mark.parametrize("quantizer", sorted(QUANTIZERS))
def test_model_folder_round_trip_gives_the_same_codes_and_images(quantizer, tmp_path):
    from dalle1.checkpoint import load_vae

    torch.manual_seed(0)
    vae = DiscreteVAE(tiny_cfg(quantizer, recon_loss="logit_laplace"))
    images = torch.rand(3, 3, 16, 16)
    vae.train()
    vae(images)
    vae.eval()
    save_vae(vae, tmp_path / "vae")
    loaded = load_vae(tmp_path / "vae")
    codes = vae.encode(images)
    assert torch.equal(loaded.encode(images), codes)
    assert torch.equal(loaded.decode(codes), vae.decode(codes))
