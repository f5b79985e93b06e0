"""AdamW as the trainer runs it: fused into one kernel where torch has one, the same update
as torch's per-tensor loop, and gradient clipping that still applies to it under bf16."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from dalle1.config import Config, TrainConfig, load_config
from dalle1.training import fit
from dalle1.training.systems import StageModule, fused_adamw


def params() -> list[torch.nn.Parameter]:
    return list(torch.nn.Linear(4, 3).parameters())


@pytest.mark.parametrize(
    "train, fused",
    [
        (TrainConfig(), True),
        (TrainConfig(precision="bf16-mixed"), True),
        (TrainConfig(precision="16-mixed"), False),  # loss-scaled gradients: Lightning unscales
        (TrainConfig(strategy="fsdp"), False),  # sharded parameters keep the per-tensor loop
    ],
)
def test_fused_adamw_where_torch_and_lightning_allow_it(train, fused):
    assert fused_adamw(train, params()) is fused


def test_no_fused_adamw_for_parameters_off_cpu_and_cuda():
    meta = [torch.nn.Parameter(torch.empty(3, device="meta"))]
    assert not fused_adamw(TrainConfig(), meta)


def test_the_fused_kernel_makes_the_loops_update():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    twin = copy.deepcopy(model)
    kw = dict(lr=1e-2, weight_decay=0.01, betas=(0.9, 0.96))
    opts = [
        torch.optim.AdamW(model.parameters(), fused=True, **kw),
        torch.optim.AdamW(twin.parameters(), foreach=False, **kw),
    ]
    for step in range(5):
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert not torch.equal(a, torch.zeros_like(a))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class Tiny(StageModule):
    def __init__(self, train: TrainConfig):
        super().__init__(Config(train=train))
        self.layer = torch.nn.Linear(6, 6)


def test_the_trainers_optimizer_is_fused_and_its_gradients_clip_to_the_norm():
    module = Tiny(TrainConfig(precision="bf16-mixed", grad_clip=0.5))
    opt = module.configure_optimizers()["optimizer"]
    assert opt.defaults["fused"] is True
    for p in module.parameters():
        p.grad = torch.full_like(p, 3.0)
    module.configure_gradient_clipping(opt, 0.5, "norm")
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in module.parameters()]))
    assert norm.item() == pytest.approx(0.5, rel=1e-5)


def test_fp16_keeps_the_per_tensor_loop():
    opt = Tiny(TrainConfig(precision="16-mixed")).configure_optimizers()["optimizer"]
    assert not opt.defaults["fused"]


def test_bf16_training_with_clipping_runs_the_fused_optimizer(tmp_path, shapes_dir):
    """Lightning refuses to clip a fused optimizer under mixed precision; the trainer's
    own clipping hook lets bf16 runs (the demo's precision) keep it."""
    seen = []

    class Probe(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            seen.append(optimizer.defaults["fused"])

    cfg = load_config(
        "configs/tiny_vae.yaml",
        [
            f"data.path={shapes_dir}",
            f"train.out_dir={tmp_path}",
            "train.max_steps=3",
            "train.precision=bf16-mixed",
            "train.grad_clip=0.01",
            "train.progress_bar=false",
        ],
    )
    assert (fit(cfg, callbacks=[Probe()]) / "vae").is_dir()
    assert seen == [True] * 3
