"""dalle1 plan: its counts are the model's (meta build, FlopCounterMode, saved tensors)."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dalle1 import planning
from dalle1.cli import main
from dalle1.config import DALLEConfig, load_config
from dalle1.planning import (
    PlanOptions,
    activation_bytes_per_layer,
    decode_bytes_per_step,
    forward_flops,
    meta_model,
    parameter_counts,
    plan,
    stream_shape,
    train_flops_per_token,
)
from dalle1.transformer import DALLE, StreamShape

TINY = DALLEConfig(dim=32, depth=2, heads=2, dim_head=16, ff_mult=4, conv_kernel=3)
TINY_SHAPE = StreamShape(text_vocab=280, text_len=8, image_vocab=64, grid=4, bos_id=1)


def test_the_paper_shape_builds_on_the_meta_device_with_its_parameter_count():
    config = load_config("configs/paper_dalle.yaml")
    start = time.perf_counter()
    model = meta_model(config.dalle, stream_shape(config))
    assert time.perf_counter() - start < 10
    assert parameter_counts(model)["total"] == 12_292_329_344
    assert all(p.is_meta for p in model.parameters())
    # training FLOPs per token at the paper's shape: 6 x the matmul weights a token meets
    # (12.13B) + 12 x layers x attention width x stream (3.90 GFLOP) = 76.69 GFLOP
    assert train_flops_per_token(model) == pytest.approx(76.689e9, rel=1e-4)


def test_parameter_count_equals_a_real_model():
    real = DALLE(TINY, TINY_SHAPE)
    counts = parameter_counts(meta_model(TINY, TINY_SHAPE))
    assert counts["total"] == sum(p.numel() for p in real.parameters())
    assert counts["layers"] == sum(p.numel() for p in real.layers.parameters())


def test_flops_by_hand_for_a_tiny_config():
    # dim 32, 2 layers, 2 heads x 16, feed-forward 128; stream S = 8 text + 16 codes = 24
    per_layer = 3 * 32 * 32 + 32 * 32 + 32 * 128 + 128 * 32  # q, k, v, out, ff in, ff out
    macs = 24 * 2 * per_layer  # every position through both layers: 589,824
    macs += 8 * 32 * 280 + 16 * 32 * 64  # text head at 8 positions, image head at 16
    macs += 2 * (24 * 24) * 2 * 32  # attention: q.k and p.v over 24 x 24 pairs, width 32
    model = meta_model(TINY, TINY_SHAPE)
    assert macs == 768_000
    assert forward_flops(model) == 2 * macs
    assert train_flops_per_token(model) == 3 * 2 * macs / 24 == 192_000


@pytest.mark.parametrize("attention", ["dense", "dalle"])
def test_flops_equal_what_torch_counts_in_a_training_step(attention):
    cfg = replace(TINY, attention=attention)
    torch.manual_seed(0)
    model = DALLE(cfg, TINY_SHAPE)
    text = torch.randint(2, 272, (3, 8))
    codes = torch.randint(0, 64, (3, 16))
    with FlopCounterMode(display=False) as counter:
        loss, _ = model.loss(text, codes)
        loss.backward()
    # torch counts every matmul but not the CPU attention kernel: that part is the hand
    # count's, 3 (fwd + bwd) x 2 FLOPs x 2 (q.k, p.v) x width 32 x 24² pairs x 2 layers
    attention = 3 * 2 * (2 * 32 * 24 * 24 * 2)
    assert counter.get_total_flops() == (train_flops_per_token(model) * 24 - attention) * 3
    # the masks' own pairs are fewer than S² (row / column / conv are sparse)
    assert train_flops_per_token(model, "needed") < train_flops_per_token(model)


@pytest.mark.parametrize("kind", ["dense", "row"])
def test_activation_bytes_equal_what_autograd_saves(kind):
    cfg = DALLEConfig(dim=64, depth=1, heads=4, dim_head=16, attention="dense")
    model = DALLE(cfg, TINY_SHAPE, kinds=[kind])
    batch, S = 2, 24
    x = torch.randn(batch, S, 64, requires_grad=True)
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model._layer(0, kind, x)
    for table in model._tables.values():  # the mask tables are the model's, not the batch's
        fields = vars(table).values() if hasattr(table, "__dataclass_fields__") else table
        for t in [*fields, *getattr(table, "biases", {}).values()]:  # a plan's biases too
            if isinstance(t, torch.Tensor):
                saved.pop(t.untyped_storage().data_ptr(), None)
    expected = batch * activation_bytes_per_layer(model, kind, "32-true")
    # not modelled: the two LayerNorm gains re-made per layer (gamma + 1), and
    # for a sparse layer its gather indices and the padded slots of its last block
    slack = 2 * 64 * 4
    if kind != "dense":
        plan = model.block_plan(kind, x.device)
        padded = plan.queries.numel() - (S - plan.text)
        slack += 8 * (plan.queries.numel() + 2 * plan.keys.numel())
        slack += batch * padded * (4 * 16 + 1) * 4  # output and log-sum-exp per head
    assert 0 <= sum(saved.values()) - expected <= slack


def test_decode_bytes_by_hand():
    model = meta_model(TINY, TINY_SHAPE)  # dense: every layer reads every cached key
    used = sum(p.numel() for p in model.layers.parameters()) + 2 * 32 + (32 * 64 + 64)
    # the steps feed positions 9 … 23, attending 10 … 24 keys: 17 on average
    kv = 5 * 2 * (2 * 32 * 17 * 2)  # batch 5, 2 layers, keys + values, width 32, 2 bytes
    assert decode_bytes_per_step(model, 5, sparse_keys=False) == used * 2 + kv
    assert decode_bytes_per_step(model, 5, sparse_keys=True) == used * 2 + kv
    sparse = meta_model(replace(TINY, attention="dalle"), TINY_SHAPE)
    assert decode_bytes_per_step(sparse, 5, True) < decode_bytes_per_step(sparse, 5, False)


def test_plan_memory_shrinks_with_more_gpus_and_with_checkpointing():
    config = load_config("configs/paper_dalle.yaml")
    p8, p64 = (plan(config, PlanOptions(gpus=n)) for n in (8, 64))
    total = 12_292_329_344
    assert p8["memory_per_gpu"]["checkpointing"]["state"] == 16 * total / 8
    assert p64["memory_per_gpu"]["checkpointing"]["state"] == 16 * total / 64
    for p in (p8, p64):
        m = p["memory_per_gpu"]
        assert m["checkpointing"]["total"] < m["no_checkpointing"]["total"]
    assert p8["flops"]["global_batch"] == 1024  # the paper's: 1 per GPU x 1024 GPUs
    assert p8["step_time_s"] == pytest.approx(8 * p64["step_time_s"])


def test_plan_command_prints_the_paper_shape_for_8_and_64_gpus(capsys):
    assert main(["plan", "--config", "configs/paper_dalle.yaml", "--gpus", "8", "64"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 12,292,329,344" in out
    assert "8 GPUs" in out and "64 GPUs" in out and "memory/GPU with checkpointing" in out
    assert "76.69 GFLOP" in out and "image tokens/s" in out
    args = ["plan", "--config", "configs/paper_dalle.yaml", "--gpus", "8", "--gpu", "h200"]
    assert main([*args, "--json"]) == 0
    (figures,) = json.loads(capsys.readouterr().out)
    assert figures["parameters"]["total"] == 12_292_329_344
    assert figures["gpu"]["name"].startswith("NVIDIA H200")


def test_plan_reads_precision_auto_as_bf16_on_the_datasheet_gpus(capsys):
    """Every GPU ``dalle1 plan`` knows has bf16, which ``train.precision: auto`` trains in."""
    args = ["plan", "--config", "configs/paper_dalle.yaml", "--gpus", "8", "--json"]
    plans = {}
    for precision in ("auto", "bf16-mixed", "32-true"):
        assert main([*args, f"train.precision={precision}"]) == 0
        (figures,) = json.loads(capsys.readouterr().out)
        figures.pop("meta_build_s")  # the one timing in the report
        plans[precision] = figures
    assert plans["auto"] == plans["bf16-mixed"] != plans["32-true"]


@pytest.mark.parametrize(
    ("bf16_rate", "precision", "expected"),
    [
        (1e9, "bf16-mixed", (4e9, "measured (cpu, torch.float32)")),  # no bf16 instructions
        (9e9, "bf16-mixed", (9e9, "measured (cpu, torch.bfloat16)")),  # AMX / AVX512-BF16
        (9e9, "32-true", (4e9, "measured (cpu, torch.float32)")),  # float32 training
    ],
)
def test_measured_peak_is_the_faster_matmul_rate_under_bf16(
    monkeypatch, bf16_rate, precision, expected
):
    # MFU divides by this peak: a bf16 rate a CPU only emulates would put MFU above 1
    rates = {torch.bfloat16: bf16_rate, torch.float32: 4e9}
    monkeypatch.setattr(planning, "measure_matmul_flops", lambda device, dtype: rates[dtype])
    assert planning.device_peak_flops(torch.device("cpu"), precision) == expected
