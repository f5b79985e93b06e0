"""The contrastive scorer, ranking, zero-shot labels, `dalle1 eval` and `dalle1 synth`."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from dalle1 import DALLEPipeline
from dalle1.apps.evaluate import read_prompts
from dalle1.checkpoint import load_clip
from dalle1.cli import main
from dalle1.clip import clip_loss, same_text, zero_shot
from dalle1.config import load_config
from dalle1.rerank import likelihood_scores, rank
from dalle1.training import fit


@pytest.fixture(scope="module")
def clip_model(tiny_model, shapes_dir, tmp_path_factory):
    """A copy of the tiny model folder with a tiny trained clip/ added by train.py's clip stage."""
    root = tmp_path_factory.mktemp("clip")
    folder = shutil.copytree(tiny_model, root / "model")
    cfg = load_config(
        "configs/tiny_clip.yaml",
        [f"data.path={shapes_dir}", f"train.out_dir={root / 'run'}", f"clip.model={folder}"],
    )
    assert fit(cfg) == folder
    return folder


# --- the loss ------------------------------------------------------------------------------


def hand_info_nce(sims: list[list[float]], scale: float, targets: list[list[int]]) -> float:
    """Cross-entropy both ways with python floats; targets[i] = columns that match row i."""

    def direction(matrix, tgt):
        total = 0.0
        for i, row in enumerate(matrix):
            logits = [scale * v for v in row]
            log_z = math.log(sum(math.exp(v) for v in logits))
            total += -sum(logits[j] - log_z for j in tgt[i]) / len(tgt[i])
        return total / len(matrix)

    cols = [[r for r in range(len(sims)) if c in targets[r]] for c in range(len(sims))]
    transposed = [list(col) for col in zip(*sims)]
    return 0.5 * (direction(sims, targets) + direction(transposed, cols))


def test_info_nce_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=-1)
    log_scale = math.log(1 / 0.07)
    sims = (img @ txt.t()).tolist()
    want = hand_info_nce(sims, 1 / 0.07, [[0], [1], [2]])
    got = clip_loss(img, txt, torch.tensor(log_scale, dtype=torch.float64))
    assert got.item() == pytest.approx(want, rel=1e-9)
    # rows 0 and 2 share a caption: each counts the other as a match as well
    same = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)
    want_same = hand_info_nce(sims, 1 / 0.07, [[0, 2], [1], [0, 2]])
    assert clip_loss(img, txt, log_scale, same).item() == pytest.approx(want_same, rel=1e-9)
    # the soft-target form reduces to plain InfoNCE when every caption is different
    eye = torch.eye(3, dtype=torch.bool)
    assert clip_loss(img, txt, log_scale, eye).item() == pytest.approx(got.item(), rel=1e-9)


def test_same_text_marks_identical_rows():
    text = torch.tensor([[1, 2, 9], [3, 2, 9], [1, 2, 9]])
    assert same_text(text).tolist() == [
        [True, False, True],
        [False, True, False],
        [True, False, True],
    ]


# --- ranking -------------------------------------------------------------------------------


def test_rank_is_a_sorted_permutation_per_group():
    scores = torch.randn(4 * 6, generator=torch.Generator().manual_seed(1))
    full = rank(scores, 6)
    assert full.shape == (24,)
    for g in range(4):
        idx = full[g * 6 : (g + 1) * 6]
        assert sorted(idx.tolist()) == list(range(g * 6, (g + 1) * 6))
        s = scores[idx]
        assert torch.all(s[:-1] >= s[1:])
    top = rank(scores, 6, keep=2)
    assert top.tolist() == torch.cat([full[g * 6 : g * 6 + 2] for g in range(4)]).tolist()
    with pytest.raises(ValueError, match="keep"):
        rank(scores, 6, keep=7)


# --- training and export -------------------------------------------------------------------


def test_clip_stage_adds_clip_to_the_folder_and_leaves_the_rest(clip_model, tiny_model):
    assert (clip_model / "clip/config.json").exists()
    assert (clip_model / "clip/model.safetensors").exists()
    assert not [p for p in clip_model.iterdir() if p.name.startswith(".")]  # no temp folders
    for part in ("dalle/model.safetensors", "vae/model.safetensors", "tokenizer.json"):
        assert (clip_model / part).read_bytes() == (tiny_model / part).read_bytes()
    clip = load_clip(clip_model)
    pipe = DALLEPipeline.from_pretrained(clip_model)
    assert pipe.clip is not None and clip.text_vocab == pipe.tokenizer.vocab_size
    for a, b in zip(clip.state_dict().values(), pipe.clip.state_dict().values()):
        assert torch.equal(a, b)


def test_clip_stage_needs_a_model_folder(shapes_dir, tmp_path):
    cfg = load_config(
        "configs/tiny_clip.yaml", [f"data.path={shapes_dir}", f"train.out_dir={tmp_path}"]
    )
    cfg.clip.model = ""
    with pytest.raises(ValueError, match="clip.model must name"):
        fit(cfg)


# --- reranking in the pipeline ---------------------------------------------------------------


def test_rerank_with_clip_keeps_the_best_candidates(clip_model):
    pipe = DALLEPipeline.from_pretrained(clip_model)
    prompts = ["a red circle", "a blue square"]
    plain = pipe(prompts, num_images=5, seed=7, score=True)
    best = pipe(prompts, num_images=5, seed=7, rerank=True, keep=2)
    assert len(best.images) == 4 and best.codes.shape[0] == 4
    assert best.prompts == ["a red circle"] * 2 + ["a blue square"] * 2
    order = rank(torch.tensor(plain.scores), 5, 2).tolist()
    assert best.seeds == [plain.seeds[i] for i in order]
    assert torch.equal(best.codes, plain.codes[order])
    assert best.scores == pytest.approx([plain.scores[i] for i in order])
    for g in range(2):
        s = best.scores[g * 2 : g * 2 + 2]
        assert s[0] >= s[1]
        assert s[0] == pytest.approx(max(plain.scores[g * 5 : g * 5 + 5]))
    # the scores are the clip cosines of the decoded images
    text = pipe.tokenizer.encode(plain.prompts)
    want = pipe.clip.similarity(pipe.vae.decode(plain.codes), text)
    assert plain.scores == pytest.approx(want.tolist(), abs=1e-5)
    assert all(-1 - 1e-6 <= s <= 1 + 1e-6 for s in plain.scores)


def test_self_ranking_without_a_scorer(tiny_model):
    pipe = DALLEPipeline.from_pretrained(tiny_model)
    assert pipe.clip is None
    out = pipe("a green triangle", num_images=4, seed=1, rerank=True)
    assert sorted(out.seeds) == [1, 2, 3, 4]
    want = likelihood_scores(pipe.dalle, pipe.tokenizer.encode(out.prompts), out.codes)
    assert out.scores == pytest.approx(want.tolist(), abs=1e-5)
    assert out.scores == sorted(out.scores, reverse=True)
    assert all(s <= 0 for s in out.scores)  # mean log-probabilities
    with pytest.raises(ValueError, match="keep needs rerank"):
        pipe("a green triangle", num_images=2, keep=1, rerank=False)
    best = pipe("a green triangle", num_images=4, seed=1, keep=1)  # keep alone implies rerank
    assert best.seeds == out.seeds[:1] and best.scores == pytest.approx(out.scores[:1], abs=1e-5)


# --- zero-shot classification ---------------------------------------------------------------


def test_classify_cli_agrees_with_zero_shot(clip_model, shapes_dir, capsys):
    from dalle1.images import load_image

    files = sorted(str(p) for p in shapes_dir.glob("*.png"))[:3]
    labels = ["circle", "square", "triangle"]
    assert main(["classify", "--model", str(clip_model), "--labels", ",".join(labels),
                 "--template", "a red {}", "--template", "a blue {}", "--json", *files]) == 0  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in rows] == files
    pipe = DALLEPipeline.from_pretrained(clip_model)
    images = torch.stack([load_image(f, pipe.clip.image_size) for f in files])
    probs = zero_shot(pipe.clip, pipe.tokenizer, images, labels, ["a red {}", "a blue {}"])
    for row, p in zip(rows, probs):
        assert row["label"] == labels[int(p.argmax())]
        assert sum(row["probs"].values()) == pytest.approx(1.0, abs=1e-4)
    assert main(["classify", "--model", str(clip_model), "--labels", "a,b",
                 "--template", "no placeholder", files[0]]) == 2  # fmt: skip
    assert "must contain '{}'" in capsys.readouterr().err


# --- eval ---------------------------------------------------------------------------------------


def test_read_prompts_formats(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text(
        '# comment\n{"prompt": "a red circle", "label": "red"}\nblue\ta blue square\na white one\n'
    )
    assert read_prompts(path) == [
        {"prompt": "a red circle", "label": "red"},
        {"prompt": "a blue square", "label": "blue"},
        {"prompt": "a white one", "label": None},
    ]
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="p.txt:1"):
        read_prompts(path)


def test_eval_cli_prints_the_figures(clip_model, shapes_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "a red circle", "label": "red"}\n{"prompt": "a blue square", "label": "blue"}\n'
    )
    argv = ["eval", "--model", str(clip_model), "--data", str(shapes_dir), "--prompts",
            str(prompts), "--num-images", "3", "--keep", "1", "--template", "a {} circle"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["held_out_pairs"] == 6  # 48 pairs x val_fraction 0.125
    assert result["image_bits_per_token"] > 0 and result["text_bits_per_token"] > 0
    assert result["labels"] == ["blue", "red"]
    assert result["score_mean_reranked"] >= result["score_mean_all"] - 1e-6
    for key in ("caption_match_all", "caption_match_reranked", "label_match_all"):
        assert 0.0 <= result[key] <= 1.0
    assert main([*argv[:-4], "--keep", "5"]) == 2  # keep > num_images


# --- synth --------------------------------------------------------------------------------------


def synth_argv(model, out, templates, per_class, *extra):
    return ["synth", "--model", str(model), "--classes", "red,blue", "--templates",
            str(templates), "--per-class", str(per_class), "--out", str(out),
            "--batch-size", "4", *extra]  # fmt: skip


def manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_synth_layout_min_score_and_resume(clip_model, tmp_path, capsys):
    templates = tmp_path / "templates.txt"
    templates.write_text("a {} circle\na small {} square at the top\n")
    every = tmp_path / "every"
    assert main(synth_argv(clip_model, every, templates, 3)) == 0
    rows = manifest(every)
    assert len(rows) == 6
    assert sorted(p.relative_to(every).as_posix() for p in every.rglob("*.png")) == sorted(
        r["file"] for r in rows
    )
    assert {r["class"] for r in rows} == {"red", "blue"}
    for r in rows:
        assert set(r) == {"file", "class", "index", "prompt", "score", "seed"}
        assert r["file"].startswith(f"{r['class']}/")
        assert r["prompt"] == ["a {} circle", "a small {} square at the top"][
            r["index"] % 2
        ].format(r["class"])
    # the same seeds give the same scores; a threshold at the median drops the lower half
    scores = sorted(r["score"] for r in rows)
    threshold = (scores[2] + scores[3]) / 2
    capsys.readouterr()
    kept_dir = tmp_path / "kept"
    assert main(synth_argv(clip_model, kept_dir, templates, 3, "--min-score", str(threshold))) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["kept"] == 3 and summary["dropped"] == 3
    kept = manifest(kept_dir)
    assert all(r["score"] >= threshold for r in kept)
    assert {(r["class"], r["index"], r["seed"]) for r in kept} == {
        (r["class"], r["index"], r["seed"]) for r in rows if r["score"] >= threshold
    }
    assert len(list(kept_dir.rglob("*.png"))) == 3
    # re-running makes nothing; a larger --per-class makes only the new indices
    assert main(synth_argv(clip_model, kept_dir, templates, 3, "--min-score", str(threshold))) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["made"] == 0 and summary["skipped_existing"] == 6
    assert manifest(kept_dir) == kept
    assert main(synth_argv(clip_model, every, templates, 4)) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["made"] == 2 and summary["images_per_class"] == {"red": 4, "blue": 4}
    files = [r["file"] for r in manifest(every)]
    assert len(files) == len(set(files)) == 8 == len(list(every.rglob("*.png")))
    # an image whose manifest line was lost in a crash is made again, not duplicated
    lines = (every / "manifest.jsonl").read_text().splitlines()
    (every / "manifest.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    assert main(synth_argv(clip_model, every, templates, 4)) == 0
    assert [r["file"] for r in manifest(every)] == files
    assert len(list(every.rglob("*.png"))) == 8
