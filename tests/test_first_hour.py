"""A newcomer's first hour: recommended sampling settings, a run you can watch, Ctrl-C,
self-contained model folders, a conventional command line."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from dalle1.apps import explain as ex
from dalle1.apps.ui import recommended_controls, slider_options
from dalle1.cli import build_parser, main, sampling_options
from dalle1.config import ConfigError, load_config
from dalle1.data.glyphs import make_glyphs_dataset, parse_glyph_caption, read_glyph
from dalle1.editing import edit_warnings
from dalle1.images import load_image
from dalle1.pipeline import DALLEPipeline, TruncatedPromptWarning
from dalle1.recommend import (
    Recommended,
    choose,
    judge_images,
    load_recommended,
    nearest_rivals,
    one_standard_error,
    save_recommended,
    settings,
    words_changed,
)
from dalle1.rerank import rank
from dalle1.sampling import SamplingOptions, sample_codes
from dalle1.text import TextTokenizer, auto_text_len
from dalle1.training import fit
from dalle1.training.resilience import safe_torch_load

REPO = Path(__file__).resolve().parents[1]


def with_settings(tiny_model: Path, tmp_path: Path, options: SamplingOptions, candidates=1):
    folder = shutil.copytree(tiny_model, tmp_path / "model")
    save_recommended(folder, Recommended(options, candidates, "likelihood"))
    return folder


# --- recommended sampling settings ----------------------------------------------------------


def test_training_writes_the_settings_it_chose_with_their_figures(tiny_model):
    rec = load_recommended(tiny_model)
    saved = json.loads((tiny_model / "sampling.json").read_text())
    assert saved["judge"] == "likelihood" and saved["candidates"] == 1  # no scorer: no reranking
    # configs/tiny_dalle.yaml sweeps cond_scale over [1, 3]: one row each, the chosen one among them
    assert [row["options"]["cond_scale"] for row in saved["sweep"]] == [1.0, 3.0]
    assert all(0 <= row["score"] <= 1 and row["images"] == 4 * 2 for row in saved["sweep"])
    assert asdict(rec.options) in [row["options"] for row in saved["sweep"]]
    best = max(saved["sweep"], key=lambda r: r["score"])
    chosen = next(r for r in saved["sweep"] if r["options"] == asdict(rec.options))
    assert chosen["score"] >= best["score"] - best["stderr"]  # the one-standard-error rule


def test_one_standard_error_rule_prefers_the_simpler_setting():
    from dalle1.recommend import SweepRow

    rows = [
        SweepRow(SamplingOptions(cond_scale=1.0), 1, 0.50, 0.02, 64, (0, 0)),
        SweepRow(SamplingOptions(cond_scale=2.0), 1, 0.70, 0.03, 64, (0, 1)),
        SweepRow(SamplingOptions(cond_scale=3.0), 1, 0.72, 0.03, 64, (0, 2)),
        SweepRow(SamplingOptions(cond_scale=3.0), 4, 0.80, 0.02, 64, (1, 2)),
    ]
    assert one_standard_error(rows) is rows[3]  # reranking clearly better: worth its cost
    assert one_standard_error(rows[:3]) is rows[1]  # 0.70 is within 0.03 of 0.72
    grid = settings({"top_k": 4}, {"cond_scale": [1.0, 2.0], "temperature": [1.0, 0.5]})
    assert [(o.cond_scale, o.temperature, o.top_k) for o in grid] == [
        (1.0, 1.0, 4),
        (1.0, 0.5, 4),
        (2.0, 1.0, 4),
        (2.0, 0.5, 4),
    ]


def test_the_judges_rivals_are_the_nearest_captions_but_never_a_paraphrase():
    assert words_changed("a large red circle", "a large blue circle") == 1
    assert words_changed("a red circle", "a small red circle on the left") == 4
    assert words_changed("", "a b") == 2 and words_changed("a b", "a b") == 0
    held_out = [
        ["a small red circle on the left", "a red circle on the left", "a red circle"],
        ["a small blue circle on the left", "a blue circle"],
        ["a small red square on the left"],
        ["a large green triangle at the top"],
    ]
    prompts = ["a small red circle on the left", "a small blue circle on the left"]
    near = nearest_rivals(prompts, held_out, count=3)
    # one word away first (ties alphabetically); its own image's other lines are never rivals
    assert near[0] == [
        "a small blue circle on the left",  # 1 word changed
        "a small red square on the left",  # 1
        "a blue circle",  # 5, before "a large green triangle at the top" (5, alphabetically)
    ]  # "a red circle on the left" (2 words) is a line of the prompt's own image: not a rival
    assert near[1] == [
        "a small red circle on the left",
        "a red circle on the left",  # a paraphrase of another image: a true rival here
        "a small red square on the left",
    ]
    # no held-out lines: the other prompts are the rivals
    assert nearest_rivals(["a", "b", "c"], count=5) == [["b", "c"], ["a", "c"], ["a", "b"]]
    with pytest.raises(ValueError, match="two distinct"):
        nearest_rivals(["a red circle"], [["a red circle", "a circle"]])


def test_the_judge_passes_an_image_only_when_its_caption_beats_every_rival():
    """A scorer that reads colour only: a red picture beats the blue rival but not the
    red-square one, so it fails against near rivals and passes against far ones."""

    class ColourScorer(torch.nn.Module):
        words = ["red", "blue", "green"]

        def encode_image(self, images):
            return images.mean((2, 3))

        def encode_text(self, text):
            rows = tokenizer.decode(text)
            return torch.tensor([[float(w in r) for w in self.words] for r in rows])

    tokenizer = TextTokenizer.train(["a red circle a blue square a green square"] * 4, 300, 12)
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1
    own = torch.tensor([0])
    near = [["a blue circle", "a red square"]]
    far = [["a blue circle", "a green square"]]
    prompts = ["a red circle"]
    judge = ColourScorer()
    assert judge_images(red, own, prompts, tokenizer, judge, rivals=far).tolist() == [1.0]
    assert judge_images(red, own, prompts, tokenizer, judge, rivals=near).tolist() == [0.0]


def test_sampling_json_plugs_in_new_options_and_ignores_unknown_ones(tmp_path):
    (tmp_path / "sampling.json").write_text(
        json.dumps({"options": {"cond_scale": 2.5, "future_option": 1}, "candidates": 3})
    )
    with pytest.warns(UserWarning, match="future_option"):
        rec = load_recommended(tmp_path)
    assert rec.options == SamplingOptions(cond_scale=2.5) and rec.candidates == 3
    assert load_recommended(tmp_path / "elsewhere").options == SamplingOptions()  # no file: plain
    save_recommended(tmp_path, Recommended(SamplingOptions(top_k=7), 2, "clip"))
    assert load_recommended(tmp_path).options == SamplingOptions(top_k=7)


def test_pipeline_cli_and_ui_use_the_recommended_settings(tiny_model, tmp_path, capsys):
    recommended = SamplingOptions(temperature=0.9, top_k=5, cond_scale=3.0)
    folder = with_settings(tiny_model, tmp_path, recommended)
    pipe = DALLEPipeline.from_pretrained(folder)
    assert pipe.recommended.options == recommended
    text = pipe.tokenizer.encode(["a red circle"] * 2)
    by_hand = sample_codes(
        pipe.dalle,
        text,
        **asdict(recommended),
        null_text=pipe.tokenizer.pad_row(),
        generators=[torch.Generator().manual_seed(s) for s in (4, 5)],
    )
    out = pipe("a red circle", num_images=2, seed=4)
    assert torch.equal(out.codes, by_hand) and out.options == recommended
    plain = pipe("a red circle", num_images=2, seed=4, top_k=None, cond_scale=1.0, temperature=1.0)
    assert plain.options == SamplingOptions() and not torch.equal(plain.codes, by_hand)
    # the command line: flags left out take the folder's values; --cond-scale 1 turns guidance off
    args = ["sample", "--model", str(folder), "--prompt", "a red circle", "--num-images", "2"]
    assert main([*args, "--seed", "4", "--out", str(tmp_path / "cli")]) == 0
    cli = [load_image(tmp_path / "cli" / f"00_0{i}.png", 16) for i in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(cli, out.pixels))
    assert (
        "sampling: temperature=0.9, top_k=5, cond_scale=3.0"
        in (tmp_path / "cli" / "captions.txt").read_text()
    )
    parsed = build_parser().parse_args([*args, "--cond-scale", "1", "--top-k", "0"])
    assert sampling_options(parsed, recommended) == SamplingOptions(temperature=0.9)
    # the UI's controls start at the recommended values; options without a slider keep theirs
    start = recommended_controls(pipe)
    assert (start["temperature"], start["top_k"], start["top_p"], start["cond_scale"]) == (
        0.9,
        5,
        1.0,
        3.0,
    )
    assert slider_options(0.9, 5, 1.0, 3.0, recommended) == recommended
    # edits take the guidance too
    assert pipe.edit(out.images[0], "a blue circle", box=(0, 0, 8, 8)).options == recommended


def test_recommended_reranking_keeps_the_best_of_the_pool(tiny_model, tmp_path):
    folder = with_settings(tiny_model, tmp_path, SamplingOptions(), candidates=3)
    pipe = DALLEPipeline.from_pretrained(folder)
    out = pipe("a red circle", num_images=2, seed=0)
    assert len(out.images) == 2 and out.candidates == 3
    pool = pipe("a red circle", num_images=6, seed=0, score=True, rerank=False)
    assert set(out.seeds) <= set(range(6))
    best = sorted(pool.scores, reverse=True)
    assert out.scores == pytest.approx(best[:2], abs=1e-5) or len(set(pool.codes.tolist())) < 6
    assert len(pipe("a red circle", num_images=2, seed=0, rerank=False).images) == 2


def test_reranking_returns_distinct_codes():
    codes = torch.tensor([[1, 1], [2, 2], [1, 1], [3, 3], [1, 1], [2, 2]])
    scores = torch.tensor([0.9, 0.5, 0.9, 0.1, 0.8, 0.7])  # the likeliest image, three times
    assert rank(scores, 6, 3).tolist() == [0, 2, 4]  # by score alone: the same image 3x
    picked = rank(scores, 6, 3, codes=codes)
    assert picked.tolist() == [0, 5, 3] and len({tuple(codes[i].tolist()) for i in picked}) == 3


def test_too_few_distinct_candidates_warn(tiny_model):
    pipe = DALLEPipeline.from_pretrained(tiny_model)
    with pytest.warns(UserWarning, match="only 1 distinct images among the 4 candidates"):
        out = pipe("a red circle", num_images=4, rerank=True, keep=2, temperature=0)
    assert len(out.images) == 2


# --- text settings that fit the captions ----------------------------------------------------


def test_auto_text_len_sizes_from_the_token_counts():
    assert auto_text_len([5] * 99 + [40]) == 5 + 2  # the 99th percentile, not the outlier
    assert auto_text_len(list(range(1, 101))) == 99 + 25
    with pytest.raises(ValueError, match="no"):
        auto_text_len([])
    assert load_config(None, ["text.text_len=auto"]).text.text_len == "auto"
    with pytest.raises(ConfigError, match="neither a number nor 'auto'"):
        load_config(None, ["text.text_len=many"])


def test_text_len_auto_trains_with_what_the_captions_need(tiny_model, shapes_dir, tmp_path, capfd):
    vae = tiny_model.parent.parent / "vae" / "model"
    cfg = load_config(
        "configs/tiny_dalle.yaml",
        [
            f"data.path={shapes_dir}",
            f"train.out_dir={tmp_path}",
            f"dalle.vae={vae}",
            "text.text_len=auto",
            "train.max_steps=1",
            "sample.sweep={}",
        ],
    )
    folder = fit(cfg)
    printed = capfd.readouterr().out
    tokenizer = TextTokenizer.load(folder / "tokenizer.json", 1)
    captions = [
        line for p in sorted(shapes_dir.glob("*.txt")) for line in p.read_text().split("\n") if line
    ]
    stream = json.loads((folder / "dalle" / "config.json").read_text())["stream"]
    # sized from the training captions' token counts (the held-out ones add a few more lines)
    train_counts = tokenizer.token_counts(captions)
    assert abs(stream["text_len"] - auto_text_len(train_counts)) <= 2
    assert (
        json.loads((folder / "config.json").read_text())["text"]["text_len"] == stream["text_len"]
    )
    assert f"text.text_len=auto -> {stream['text_len']} slots" in printed
    assert "BPE vocabulary" in printed and "99th percentile" in printed


def test_truncated_prompts_warn(tiny_model, capsys):
    pipe = DALLEPipeline.from_pretrained(tiny_model)
    long = "a small red circle at the top left next to a large blue square"
    with pytest.warns(TruncatedPromptWarning, match="the model reads 8"):
        pipe(long, num_images=1, rerank=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe("a red", num_images=1, rerank=False)  # short prompts say nothing
    args = ["sample", "--model", str(tiny_model), "--prompt", long, "--num-images", "1"]
    assert main([*args, "--out", str(Path(pipe.folder).parent / "long")]) == 0
    err = capsys.readouterr().err
    assert err.count("dalle1 sample: warning: prompt") == 1 and "takes" in err


# --- a run you can watch ------------------------------------------------------------------


def test_validation_lr_and_sample_grids_during_a_short_run(tiny_model, shapes_dir, tmp_path, capfd):
    vae = tiny_model.parent.parent / "vae" / "model"

    def run(out, *extra):
        return fit(
            load_config(
                "configs/tiny_dalle.yaml",
                [
                    f"data.path={shapes_dir}",
                    f"train.out_dir={out}",
                    f"dalle.vae={vae}",
                    "train.max_steps=6",
                    "text.bpe_dropout=0",
                    "sample.sweep={}",
                    *extra,
                ],
            )
        )

    run(tmp_path / "watched", "train.val_every=2", "train.sample_every=3")
    printed = capfd.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "watched" / "logs" / "metrics.csv")))
    held = [r for r in rows if r.get("val_image_bits")]
    assert len(held) == 3 and all(float(r["val_image_bits"]) > 0 for r in held)
    assert [float(r["lr"]) for r in rows if r.get("lr")][0] > 0
    assert printed.count("held-out: val_image_bits") == 3
    grids = sorted((tmp_path / "watched" / "pictures").glob("samples_*.png"))
    assert [g.name for g in grids] == ["samples_0000003.png", "samples_0000006.png"]
    assert (tmp_path / "watched" / "pictures" / "captions.txt").read_text().startswith("row 1: ")
    assert (tmp_path / "watched" / "loss_curves.png").exists()
    # the same figures for TensorBoard, beside the CSV
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "watched" / "tensorboard"))
    board.Reload()
    held_steps = [e.step for e in board.Scalars("val_image_bits")]
    assert len(held_steps) == 3 and "lr" in board.Tags()["scalars"]
    # watching changes nothing: the same weights as a run without validation or grids
    run(tmp_path / "plain", "train.val_every=0")
    a = load_file(tmp_path / "watched/model/dalle/model.safetensors")
    b = load_file(tmp_path / "plain/model/dalle/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lightning_banner_and_advert_are_silent(shapes_dir, tmp_path, capfd):
    cfg = [f"data.path={shapes_dir}", f"train.out_dir={tmp_path}", "train.max_steps=2"]
    fit(load_config("configs/tiny_vae.yaml", cfg))
    captured = capfd.readouterr()
    text = captured.out + captured.err
    for noise in ("GPU available", "TPU available", "litlogger", "`Trainer.fit` stopped"):
        assert noise not in text, noise


def test_ctrl_c_saves_a_checkpoint_that_resume_continues(tmp_path):
    from dalle1.data import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "data", count=40, image_size=16, progress=False)
    steps = 40

    def train(out, resume=False):
        cmd = [sys.executable, "train.py", "--config", "configs/tiny_vae.yaml"]
        cmd += [f"data.path={data}", f"train.out_dir={out}", f"train.max_steps={steps}"]
        cmd += ["train.ckpt_every=1000", "train.threads=1", "data.val_fraction=0.1"]
        cmd += ["train.log_every=1", *(["--resume"] if resume else [])]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    ref = train(tmp_path / "ref")
    victim = train(tmp_path / "run")
    log = tmp_path / "run" / "logs" / "metrics.csv"
    deadline = time.time() + 120
    while victim.poll() is None and time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) > 3:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGINT)
    out, err = victim.communicate(timeout=120)
    assert victim.returncode == 130, err
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    stopped = safe_torch_load(last)["global_step"]
    assert 0 < stopped < steps  # ckpt_every=1000: only Ctrl-C can have saved it
    assert f"interrupted at step {stopped}" in err and "--resume" in err
    assert not (tmp_path / "run" / "model").exists()
    resumed = train(tmp_path / "run", resume=True)
    assert resumed.wait(timeout=180) == 0, resumed.stderr.read()
    assert ref.wait(timeout=180) == 0, ref.stderr.read()
    a = load_file(tmp_path / "ref/model/vae/model.safetensors")
    b = load_file(tmp_path / "run/model/vae/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # as if never interrupted

    def logged(out):  # step -> training loss, from the run's log history
        rows = [r for r in csv.DictReader(open(out / "logs" / "metrics.csv")) if r.get("loss")]
        return [int(r["step"]) for r in rows], {int(r["step"]): r["loss"] for r in rows}

    (ref_steps, ref_loss), (run_steps, run_loss) = (
        logged(tmp_path / "ref"),
        logged(tmp_path / "run"),
    )
    assert run_steps == sorted(set(run_steps)) == ref_steps == list(range(steps))  # each once
    assert run_loss == ref_loss


# --- self-contained model folders ----------------------------------------------------------


def test_a_moved_model_folder_draws_the_same_explain_pictures(tiny_model, tmp_path, monkeypatch):
    assert len(list((tiny_model / "examples").glob("*.png"))) >= 8
    assert (tiny_model / "history" / "dalle.csv").exists()
    assert (tiny_model / "history" / "vae.csv").exists()
    here = ex.explain(tiny_model, tmp_path / "here", seed=3, progress=False)
    moved = shutil.copytree(tiny_model, tmp_path / "far" / "away" / "model")
    monkeypatch.chdir(tmp_path / "far")
    there = ex.explain(moved, tmp_path / "there", seed=3, progress=False)
    assert not here.skipped and set(here.files) == set(there.files)
    for name in here.files:
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "there" / name).read_bytes()
    from dalle1.apps.ui import example_images

    shown = example_images(DALLEPipeline.from_pretrained(moved))
    assert shown and all(Path(p).is_relative_to(moved / "examples") for p in shown)


# --- editing says when it cannot work --------------------------------------------------------


def test_edit_warnings_name_identical_candidates_and_a_region_too_small():
    size, grid = 16, 4
    image = torch.full((3, size, size), 0.2)
    image[:, 2:14, 2:14] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]  # a red square
    small = torch.zeros(size, size, dtype=torch.bool)
    small[4:8, 4:8] = True  # one cell of 16
    cells = torch.zeros(grid * grid, dtype=torch.bool)
    cells[5] = True
    original = torch.arange(16)
    same = original.expand(3, -1).clone()
    notes = edit_warnings(image, small, same, original, cells)
    assert any("keep the region as it was" in n for n in notes)
    assert any("leaves" in n and "of the object outside" in n for n in notes)
    changed = same.clone()
    changed[:, 5] = 99
    assert any(
        "all 3 candidates are the same" in n
        for n in edit_warnings(image, small, changed, original, cells)
    )
    whole = torch.ones(size, size, dtype=torch.bool)
    varied = torch.stack([torch.full((16,), i) for i in range(3)])
    assert edit_warnings(image, whole, varied, original, torch.ones(16, dtype=torch.bool)) == []


def test_guidance_applies_to_edits_with_the_kept_codes_in_both_halves(tiny_model):
    """A greedy one-cell edit picks argmax of u + s (c - u), where c and u are the next-code
    logits of the caption and of the empty caption, both after the same kept codes."""
    pipe = DALLEPipeline.from_pretrained(tiny_model)
    image = Image.new("RGB", (16, 16), (40, 40, 40))
    ImageDraw.Draw(image).ellipse((2, 2, 13, 13), fill=(220, 30, 30))
    cells = torch.zeros(16, dtype=torch.bool)
    cells[9] = True
    text = pipe.tokenizer.encode(["a blue circle"])
    null = pipe.tokenizer.pad_row()[None]
    codes = pipe.vae.encode(load_image_tensor(image))[0]
    with torch.no_grad():
        c = pipe.dalle.next_logits_uncached(text, codes[None, :9])
        u = pipe.dalle.next_logits_uncached(null, codes[None, :9])
    picks = {}
    for s in (0.0, 1.0, 4.0):
        out = pipe.edit(
            image, "a blue circle", repaint=cells, candidates=1, temperature=0, cond_scale=s
        )
        picks[s] = int(out.codes[0, 9])
        assert picks[s] == int((u + s * (c - u)).argmax())
        assert torch.equal(out.codes[0, ~cells], codes[~cells])  # everything else is kept
    completed = pipe.complete(
        image, "a blue circle", rows=2, candidates=1, temperature=0, cond_scale=4.0
    )
    with torch.no_grad():
        c8 = pipe.dalle.next_logits_uncached(text, codes[None, :8])
        u8 = pipe.dalle.next_logits_uncached(null, codes[None, :8])
    assert int(completed.codes[0, 8]) == int((u8 + 4.0 * (c8 - u8)).argmax())


def load_image_tensor(image: Image.Image) -> torch.Tensor:
    from dalle1.images import pil_to_tensor

    return pil_to_tensor(image, 16)[None]


# --- the second built-in set, and its independent reader -------------------------------------


def test_glyphs_are_read_back_from_their_pixels(tmp_path):
    folder = make_glyphs_dataset(tmp_path / "g", count=60, image_size=32, seed=1, progress=False)
    for png in sorted(folder.glob("*.png")):
        captions = png.with_suffix(".txt").read_text().splitlines()
        assert len(captions) == 3 and "digit" in captions[1]
        assert read_glyph(load_image(png, 32)) == parse_glyph_caption(captions[0])
    assert read_glyph(torch.full((3, 32, 32), 245 / 255)) is None


# --- a conventional command line --------------------------------------------------------------


def test_help_shows_defaults_and_real_descriptions(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = capsys.readouterr().out
    assert "(default: 4)" in text and "(default: auto)" in text and "sampling.json" in text
    assert "(default: None)" not in text
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    for name in ("train", "sample", "data"):
        line = next(ln for ln in top.splitlines() if ln.strip().startswith(name + " "))
        assert len(line.split()) > 3, line  # a description, not the command's own name
    with pytest.raises(SystemExit) as version:
        main(["--version"])
    assert version.value.code == 0 and capsys.readouterr().out.startswith("dalle1 ")


def test_device_auto_is_the_default():
    from dalle1.pipeline import resolve_device

    args = build_parser().parse_args(["sample", "--model", "m", "--prompt", "p"])
    assert args.device == "auto"
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want and resolve_device("cpu").type == "cpu"


@pytest.mark.parametrize(
    "given, expect",
    [
        ({}, "None 10000"),  # nothing chosen: a tenth of a millisecond
        ({"OMP_WAIT_POLICY": "PASSIVE"}, "PASSIVE None"),  # the user's policy stands alone
        ({"GOMP_SPINCOUNT": "50"}, "None 50"),
    ],
)
def test_the_thread_spin_is_set_before_torch_loads(given, expect):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = (
        "import dalle1.cli, os, sys; "
        "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, **given}, capture_output=True, text=True
    )
    assert out.stdout.strip() == expect, out.stderr


def test_choose_samples_every_setting_and_reranks_with_a_scorer(tiny_model):
    pipe = DALLEPipeline.from_pretrained(tiny_model)
    rec = choose(
        pipe.dalle,
        pipe.vae,
        pipe.tokenizer,
        ["a red circle", "a blue square", "a green triangle"],
        sweep={"cond_scale": [1.0, 2.0]},
        candidates=[1, 2],
        images=2,
    )
    assert [(r["options"]["cond_scale"], r["candidates"]) for r in rec.sweep] == [
        (1.0, 1),
        (1.0, 2),
        (2.0, 1),
        (2.0, 2),
    ]
    assert [r["images"] for r in rec.sweep] == [12, 6, 12, 6]  # pool 2x2 per caption; best of 2
    assert rec.judge == "likelihood"


def test_any_sampling_option_can_join_the_sweep(tiny_model, tmp_path):
    """The sweep is over SamplingOptions fields by name: a field joins by being listed."""
    pipe = DALLEPipeline.from_pretrained(tiny_model)
    rec = choose(
        pipe.dalle,
        pipe.vae,
        pipe.tokenizer,
        ["a red circle", "a blue square"],
        options={"cond_scale": 1.0},
        sweep={"top_k": [None, 3], "temperature": [1.0, 0.7]},
        images=2,
    )
    tried = [(r["options"]["top_k"], r["options"]["temperature"]) for r in rec.sweep]
    assert tried == [(None, 1.0), (None, 0.7), (3, 1.0), (3, 0.7)]
    assert (rec.options.top_k, rec.options.temperature) in tried
    folder = with_settings(tiny_model, tmp_path, SamplingOptions())
    save_recommended(folder, rec)
    again = DALLEPipeline.from_pretrained(folder)
    assert again.recommended.options == rec.options
    assert again("a red circle", num_images=1).options == rec.options


def test_sampling_flags_switch_filters_off_and_keep_the_rest():
    """--top-k 0, --top-p 1 and --guidance-top-p 1 turn a filter off; flags left out keep the
    base (recommended) values, given ones replace them."""
    base = SamplingOptions(temperature=0.8, top_k=5, top_p=0.9, cond_scale=2.0, guidance_top_p=0.9)
    args = ["sample", "--model", "m", "--prompt", "p"]
    parse = build_parser().parse_args
    assert sampling_options(parse(args), base) == base
    off = parse([*args, "--top-k", "0", "--top-p", "1", "--guidance-top-p", "1"])
    assert sampling_options(off, base) == SamplingOptions(temperature=0.8, cond_scale=2.0)
    given = parse([*args, "--temperature", "0.5", "--guidance-top-p", "0.7", "--top-k", "9"])
    assert sampling_options(given, base) == SamplingOptions(0.5, 9, 0.9, 2.0, 0.7)
