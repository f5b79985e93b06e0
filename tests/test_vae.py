import copy

import torch

from dalle1.config import VAEConfig
from dalle1.vae import DiscreteVAE, codebook_usage, psnr


def tiny_vae(**kw):
    cfg = VAEConfig(
        image_size=16, hidden_dim=8, num_downsamples=2, codebook_size=32, codebook_dim=8, **kw
    )
    return DiscreteVAE(cfg)


def test_encode_decode_shapes_and_range():
    vae = tiny_vae()
    images = torch.rand(3, 3, 16, 16)
    vae.train()
    vae(images)  # k-means initialisation happens on the first training pass
    codes = vae.encode(images)
    assert codes.shape == (3, 16) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 32
    out = vae.decode(codes)
    assert out.shape == (3, 3, 16, 16) and out.min() >= 0 and out.max() <= 1


def test_encode_never_changes_the_codebook_even_in_train_mode():
    vae = tiny_vae()
    images = torch.rand(4, 3, 16, 16)
    vae.train()
    vae(images)
    before = copy.deepcopy(vae.state_dict())
    codes = vae.encode(images)
    for _ in range(3):
        assert torch.equal(vae.encode(images), codes)
    for key, value in vae.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert vae.training  # encode does not switch modes behind the caller's back


def test_training_pass_returns_a_differentiable_loss():
    vae = tiny_vae()
    loss, logs = vae(torch.rand(2, 3, 16, 16))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert vae.encoder.net[0].weight.grad is not None
    assert logs["codes"].shape == (2, 16)


def test_metrics():
    x = torch.rand(2, 3, 8, 8)
    assert psnr(x, x) == float("inf")
    assert (
        abs(psnr(x.clamp(0, 1) * 0 + 0.5, torch.full_like(x, 0.6)) - 20.0) < 1e-4
    )  # mse 0.01 -> 20 dB
    usage = codebook_usage(torch.tensor([0, 1, 1, 3]), 4)
    assert usage["usage"] == 0.75 and 1 < usage["perplexity"] < 3
