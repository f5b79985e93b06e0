"""End to end: train.py on tiny configs, a model folder, sampling through the pipeline and the CLI."""

import json
import shutil

import pytest
import torch
from PIL import Image

from dalle1 import DALLEPipeline
from dalle1.checkpoint import ModelFolderError
from dalle1.cli import main
from dalle1.images import stack_images
from dalle1.text import TextTokenizer
from dalle1.transformer import DALLE


def test_model_folder_layout(tiny_model):
    for part in (
        "config.json",
        "tokenizer.json",
        "vae/config.json",
        "vae/model.safetensors",
        "dalle/config.json",
        "dalle/model.safetensors",
    ):
        assert (tiny_model / part).exists(), part


def test_samples_are_seeded_and_survive_a_save_load_round_trip(tiny_model, tmp_path):
    pipe = DALLEPipeline.from_pretrained(tiny_model)
    a = pipe(["a red circle", "a blue square"], num_images=2, seed=3)
    assert len(a.images) == 4 and a.codes.shape == (4, 16)
    assert all(isinstance(im, Image.Image) and im.size == (16, 16) for im in a.images)
    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    b = DALLEPipeline.from_pretrained(copy)(["a red circle", "a blue square"], num_images=2, seed=3)
    assert torch.equal(a.codes, b.codes)
    assert [list(im.getdata()) for im in a.images] == [list(im.getdata()) for im in b.images]
    alone = pipe(
        "a blue square", num_images=2, seed=5
    )  # rows 2, 3 of the first call had seeds 5, 6
    assert torch.equal(alone.codes, a.codes[2:])


def test_output_pixels_are_exactly_the_images(tiny_model):
    pipe = DALLEPipeline.from_pretrained(tiny_model)
    assert pipe.folder == tiny_model
    out = pipe(["a red circle", "a blue square"], num_images=3, seed=1, rerank=True, keep=2)
    assert out.pixels.shape == (4, 3, 16, 16) and out.pixels.dtype == torch.float32
    assert torch.equal(out.pixels, stack_images(out.images, 16))  # reranked order, 8-bit values
    edit = pipe.edit(out.images[0], "a blue circle", box=(0, 0, 8, 8), candidates=2)
    assert torch.equal(edit.pixels, stack_images(edit.images, 16))
    bare = DALLEPipeline(pipe.config, pipe.vae, pipe.dalle, pipe.tokenizer)
    assert bare.folder is None
    assert torch.equal(bare("a red circle", seed=1).codes, pipe("a red circle", seed=1).codes)


def test_a_bf16_pipeline_casts_the_transformer_once_and_samples(tiny_model):
    fp32 = DALLEPipeline.from_pretrained(tiny_model)
    pipe = DALLEPipeline.from_pretrained(tiny_model, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in pipe.dalle.parameters())
    assert all(p.dtype == torch.float32 for p in pipe.vae.parameters())  # per image: float32
    out = pipe(["a red circle", "a blue square"], num_images=2, seed=3, cond_scale=2.0)
    assert out.codes.shape == (4, 16) and out.pixels.dtype == torch.float32
    # greedy codes in bf16 against float32: the first code of each row, and most codes, agree
    a = fp32(["a red circle", "a blue square"], num_images=2, temperature=0).codes
    b = pipe(["a red circle", "a blue square"], num_images=2, temperature=0).codes
    assert torch.equal(a[:, 0], b[:, 0]) and (a == b).float().mean() >= 0.75
    assert pipe.to(torch.float32) is pipe and pipe.dalle.norm.weight.dtype == torch.float32


def test_a_bfloat16_cache_reaches_sampling_from_the_pipeline_and_the_cli(
    tiny_model, tmp_path, monkeypatch
):
    monkeypatch.delenv("DALLE1_CACHE_DTYPE", raising=False)
    seen = []  # the dtype of every cache prefill builds
    prefill = DALLE.prefill

    def spy(self, *args, **kwargs):
        logits, cache = prefill(self, *args, **kwargs)
        seen.append(cache.keys[0].dtype)
        return logits, cache

    monkeypatch.setattr(DALLE, "prefill", spy)
    prompts = ["a red circle", "a blue square"]
    exact = DALLEPipeline.from_pretrained(tiny_model)(prompts, num_images=2, temperature=0)
    pipe = DALLEPipeline.from_pretrained(tiny_model, cache_dtype="bfloat16")
    rounded = pipe(prompts, num_images=2, temperature=0)
    assert seen == [torch.float32, torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in pipe.dalle.parameters())  # weights as they were
    assert (exact.codes == rounded.codes).float().mean() >= 0.75
    edited = pipe.edit(rounded.images[0], "a blue circle", box=(0, 0, 8, 8), candidates=1)
    assert seen[-1] == torch.bfloat16 and edited.codes.shape == (1, 16)  # editing samples too
    seen.clear()
    args = ["--model", str(tiny_model), "--prompt", "a red circle", "--num-images", "1"]
    args += ["--out", str(tmp_path / "out"), "--cache-dtype", "bfloat16"]
    assert main(args, command_name="sample") == 0
    assert seen == [torch.bfloat16]


def test_mismatched_parts_name_both_numbers(tiny_model, tmp_path):
    broken = shutil.copytree(tiny_model, tmp_path / "broken")
    cfg = json.loads((broken / "vae/config.json").read_text())
    cfg["codebook_size"] = 64
    (broken / "vae/config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match="size mismatch.*64"):
        DALLEPipeline.from_pretrained(broken)
    other = shutil.copytree(tiny_model, tmp_path / "other")
    tok = TextTokenizer.train(["a red circle", "a blue square"], vocab_size=270, text_len=8)
    tok.save(other / "tokenizer.json")
    with pytest.raises(
        ModelFolderError,
        match=rf"text vocabulary = \d+ but tokenizer vocabulary \(BPE \+ pads\) = {tok.vocab_size}",
    ):
        DALLEPipeline.from_pretrained(other)


def test_bad_prompt_and_num_images(tiny_model):
    pipe = DALLEPipeline.from_pretrained(tiny_model)
    with pytest.raises(ValueError, match="num_images"):
        pipe("a red circle", num_images=0)
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        pipe("", num_images=1)


def test_sample_cli_writes_pngs_and_a_grid(tiny_model, tmp_path):
    out = tmp_path / "samples"
    rc = main(
        [
            "--model",
            str(tiny_model),
            "--prompt",
            "a red circle",
            "--prompt",
            "a blue square",
            "--num-images",
            "2",
            "--out",
            str(out),
        ],
        command_name="sample",
    )
    assert rc == 0
    assert sorted(p.name for p in out.glob("0*.png")) == [
        "00_00.png",
        "00_01.png",
        "01_00.png",
        "01_01.png",
    ]
    grid = Image.open(out / "grid.png")
    assert (
        grid.size == ((2 * (16 + 2) + 2) * 4,) * 2
    )  # 2 prompts x 2 images, 2 px padding, 4x upscale
    assert "a blue square" in (out / "captions.txt").read_text()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert (
        main(["--config", "configs/tiny_vae.yaml", "train.max_stepz=1"], command_name="train") == 2
    )
    err = capsys.readouterr().err
    assert "unknown key 'train.max_stepz'" in err and len(err.strip().splitlines()) == 1
    assert main(["--model", str(tmp_path / "nope"), "--prompt", "x"], command_name="sample") == 2
    assert "does not exist" in capsys.readouterr().err


def test_sample_cli_rerank_keeps_the_best_per_prompt(tiny_model, tmp_path):
    out = tmp_path / "ranked"
    args = ["--model", str(tiny_model), "--prompt", "a red circle", "--prompt", "a blue square"]
    rc = main(
        [*args, "--num-images", "3", "--rerank", "--keep", "2", "--out", str(out)],
        command_name="sample",
    )
    assert rc == 0
    assert sorted(p.name for p in out.glob("0*.png")) == [
        "00_00.png",
        "00_01.png",
        "01_00.png",
        "01_01.png",
    ]
    lines = [line for line in (out / "captions.txt").read_text().splitlines() if "score=" in line]
    scores = [float(line.split("score=")[1].split()[0]) for line in lines]
    assert len(scores) == 4 and scores[0] >= scores[1] and scores[2] >= scores[3]
    # the kept images are the best 2 of the 3 that plain sampling draws with the same seeds
    full = DALLEPipeline.from_pretrained(tiny_model)(
        ["a red circle", "a blue square"], num_images=3, score=True
    )
    for row in range(2):
        best = sorted(full.scores[3 * row : 3 * row + 3], reverse=True)[:2]
        assert scores[2 * row : 2 * row + 2] == pytest.approx(best, abs=1e-4)


def test_training_shows_one_progress_bar_over_steps(shapes_dir, tmp_path, capfd):
    from dalle1.config import load_config
    from dalle1.training import fit

    overrides = [
        f"data.path={shapes_dir}",
        f"train.out_dir={tmp_path}",
        "train.max_steps=12",
        "train.progress_bar=true",
    ]
    fit(load_config("configs/tiny_vae.yaml", overrides))
    captured = capfd.readouterr()
    err = (captured.out + captured.err).replace("\r", "\n")  # Lightning's tqdm writes to stdout
    assert "training vae" in err and "12/12" in err
    assert (
        "/-2" not in err and "Epoch" not in err
    )  # no per-epoch bar with an open-ended epoch count
