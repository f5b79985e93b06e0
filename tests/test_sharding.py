"""Cheap construction and per-layer checkpointing (one process), data dealt over ranks, MFU."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dalle1.checkpoint import load_dalle
from dalle1.config import DALLEConfig, TrainConfig
from dalle1.planning import train_flops_per_token
from dalle1.training.fit import trainer_strategy
from dalle1.training.resilience import ResumableSampler
from dalle1.training.sharding import build_dalle
from dalle1.transformer import DALLE, StreamShape, init_weights

ROOT = Path(__file__).resolve().parents[1]
CFG = DALLEConfig(dim=32, depth=5, heads=2, dim_head=16, attention="dalle", conv_kernel=3)
SHAPE = StreamShape(text_vocab=280, text_len=8, image_vocab=64, grid=4, bos_id=1)


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert ba.keys() == bb.keys() and all(torch.equal(ba[k], bb[k]) for k in ba)
    cpu = torch.device("cpu")
    for kind in set(a.kinds) - {"dense"}:  # the mask tables, built on first use
        assert torch.equal(a.key_table(kind, cpu)[0], b.key_table(kind, cpu)[0])
        assert torch.equal(a.block_plan(kind, cpu).mask, b.block_plan(kind, cpu).mask)


def test_meta_built_then_materialised_equals_a_directly_built_model():
    torch.manual_seed(0)
    direct = DALLE(CFG, SHAPE)
    with torch.device("meta"):
        lazy = DALLE(CFG, SHAPE)
    assert all(p.is_meta for p in lazy.parameters())
    lazy.to_empty(device="cpu")  # garbage in every parameter and buffer
    torch.manual_seed(0)
    init_weights(lazy)
    assert_same(direct, lazy)


def test_build_dalle_depends_on_the_seed_only_and_leaves_the_global_rng():
    torch.manual_seed(3)
    direct = DALLE(CFG, SHAPE)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    built = build_dalle(CFG, SHAPE, torch.device("cpu"), seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert_same(direct, built)


def test_activation_checkpointing_recomputes_each_layer_and_changes_no_gradient():
    text, codes = torch.randint(2, 272, (2, 8)), torch.randint(0, 64, (2, 16))
    grads, forwards = [], []
    for on in (False, True):
        model = build_dalle(CFG, SHAPE, torch.device("cpu"), 0, activation_checkpointing=on)
        forwards.append(0)

        def count(*_):
            forwards[-1] += 1

        model.layers[0].register_forward_pre_hook(count)
        model.loss(text, codes)[0].backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
        assert [k for k, _ in model.named_parameters()] == list(DALLE(CFG, SHAPE).state_dict())
    assert forwards == [1, 2]  # checkpointed: the layer runs again in backward
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])


def test_ranks_are_dealt_one_order_and_resume_where_they_stopped():
    single = list(ResumableSampler(11, seed=5))
    ranks = [list(ResumableSampler(11, seed=5, rank=r, ranks=2)) for r in range(2)]
    assert [len(r) for r in ranks] == [5, 5]  # as many each: the 11th waits for next pass
    assert [i for pair in zip(*ranks) for i in pair] == single[:10]
    seeds = [[i.seed for i in r] for r in ranks]  # caption draws follow the position too
    assert [s for pair in zip(*seeds) for s in pair] == [i.seed for i in single[:10]]
    resumed = []
    for r in range(2):
        sampler = ResumableSampler(11, seed=5, rank=r, ranks=2)
        sampler.skip = 4  # two steps of 2 batches of 1 were trained on
        resumed.append(list(sampler))
    assert resumed == [r[2:] for r in ranks]


def test_fsdp_is_for_the_transformer_stage():
    assert trainer_strategy(TrainConfig(stage="vae", strategy="ddp")) == "ddp"
    with pytest.raises(ValueError, match="train.strategy=fsdp shards the transformer"):
        trainer_strategy(TrainConfig(stage="vae", strategy="fsdp"))
    assert type(trainer_strategy(TrainConfig(stage="dalle", strategy="fsdp"))).__name__ == (
        "ShardedDataParallel"
    )


def test_training_logs_tokens_per_second_and_mfu(tiny_model):
    rows = list(csv.DictReader(open(tiny_model.parent / "logs" / "metrics.csv")))
    logged = [r for r in rows if r.get("mfu")]
    assert len(logged) >= 3  # tiny_dalle.yaml logs every step
    per_token = train_flops_per_token(load_dalle(tiny_model / "dalle"))
    for r in logged:
        rate, mfu, peak = float(r["tokens_per_s"]), float(r["mfu"]), float(r["peak_flops"])
        assert rate > 0 and 0 < mfu < 1 and peak > 1e8
        assert mfu == pytest.approx(rate * per_token / peak, rel=1e-5)  # one process


def test_gpu_check_runs_dry_on_the_cpu(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    args = gpu_check.parse_args(["--dry-run", "--only=train", "--steps", "5"])
    assert args.passthrough == ["--dry-run", "--steps", "5"]  # what the FSDP child gets
    gpu_check.main(["--dry-run", "--only", "train"])
    gpu_check.main(["--dry-run", "--only", "decode"])
    train, decode = (json.loads(part) for part in split_json(capsys.readouterr().out))
    assert [t["attention"] for t in train["train"]] == ["dense", "dalle"]
    assert all(t["tokens_per_s"] > 0 and 0 < t["mfu"] < 1 for t in train["train"])
    assert decode["decode"]["image_tokens_per_s"] > 0 and decode["dry_run"]


def split_json(text: str) -> list[str]:
    """Consecutive pretty-printed JSON documents, each starting with a '{' line."""
    starts = [i for i, line in enumerate(text.splitlines()) if line == "{"]
    lines = text.splitlines()
    return ["\n".join(lines[a:b]) for a, b in zip(starts, [*starts[1:], len(lines)])]
