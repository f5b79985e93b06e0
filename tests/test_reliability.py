"""Bad inputs never kill an epoch; clear errors at the boundary; NaN guard; no code on load."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dalle1.checkpoint import ModelFolderError, load_parts, load_vae, save_vae
from dalle1.cli import main
from dalle1.config import ConfigError, load_config
from dalle1.data import CaptionedFolder, find_pairs, make_shapes_dataset
from dalle1.data.captions import MAX_CAPTION_CHARS, read_caption_file
from dalle1.data.check import check_folder
from dalle1.data.problems import DataProblems
from dalle1.files import atomic_write
from dalle1.images import BadImageError, load_image
from dalle1.training import fit
from dalle1.training.resilience import (
    AtomicCheckpointIO,
    CheckpointError,
    NonFiniteLossError,
    ResumableSampler,
    check_loss,
    safe_torch_load,
)
from dalle1.vae import DiscreteVAE

SIZE = 16


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_pair(folder: Path, stem: str, image: bytes | Image.Image, caption: bytes | None):
    data = png_bytes(image) if isinstance(image, Image.Image) else image
    (folder / f"{stem}.png").write_bytes(data)
    if caption is not None:
        (folder / f"{stem}.txt").write_bytes(caption)


def noisy_rgb(seed: int, size: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture()
def bad_folder(tmp_path) -> Path:
    """One folder with every kind of bad input next to good images."""
    d = tmp_path / "bad"
    d.mkdir()
    for i in range(6):
        write_pair(d, f"good{i}", noisy_rgb(i), b"a good caption\n")
    write_pair(d, "gray", Image.new("L", (SIZE, SIZE), 100), b"gray\n")
    rgba = Image.new("RGBA", (SIZE, SIZE), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, SIZE // 2, SIZE))  # left half fully transparent
    write_pair(d, "rgba", rgba, b"rgba\n")
    pal = Image.new("P", (SIZE, SIZE), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    write_pair(d, "palette", pal, b"palette\n")
    sixteen = Image.fromarray(np.full((SIZE, SIZE), 32768, dtype=np.uint16))
    write_pair(d, "sixteen", sixteen, b"16 bit\n")
    write_pair(d, "small", noisy_rgb(9, size=4), b"tiny image\n")
    full = png_bytes(noisy_rgb(7, size=64))
    write_pair(d, "truncated", full[: len(full) // 2], b"cut file\n")
    write_pair(d, "notimage", b"this is plain text, not a PNG", b"text file\n")
    write_pair(d, "empty_image", b"", b"nothing\n")
    write_pair(d, "nocaption", noisy_rgb(11), None)
    write_pair(d, "emptycaption", noisy_rgb(12), b"  \n\n")
    write_pair(d, "latin1", noisy_rgb(13), "café au lait\n".encode("latin-1"))
    write_pair(d, "utf16", noisy_rgb(14), "a red circle\n".encode("utf-16"))
    write_pair(d, "long", noisy_rgb(15), b"x" * (MAX_CAPTION_CHARS + 500))
    return d


SKIPPED = {"truncated", "notimage", "empty_image", "nocaption", "emptycaption"}


# --- conversions ----------------------------------------------------------------------------


def test_image_conversions(bad_folder):
    gray = load_image(bad_folder / "gray.png", SIZE)
    assert gray.shape == (3, SIZE, SIZE)
    assert torch.allclose(gray, torch.full_like(gray, 100 / 255))
    rgba = load_image(bad_folder / "rgba.png", SIZE)  # transparent half composited on white
    assert torch.allclose(rgba[:, :, : SIZE // 2 - 1], torch.ones(3, SIZE, SIZE // 2 - 1))
    assert torch.allclose(rgba[:, :, SIZE // 2 + 1 :].mean((1, 2)), torch.tensor([1.0, 0, 0]))
    pal = load_image(bad_folder / "palette.png", SIZE)
    assert torch.allclose(pal.mean((1, 2)), torch.tensor([10, 200, 30]) / 255)
    sixteen = load_image(bad_folder / "sixteen.png", SIZE)  # 32768/65535, not clipped to 1
    assert Image.open(bad_folder / "sixteen.png").mode.startswith("I")
    assert torch.allclose(sixteen, torch.full_like(sixteen, 128 / 255))
    small = load_image(bad_folder / "small.png", SIZE)  # 4 px upscaled to 16
    assert small.shape == (3, SIZE, SIZE) and 0 <= small.min() and small.max() <= 1


def test_palette_transparency_and_exif_rotation(tmp_path):
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=0)
    assert torch.allclose(load_image(tmp_path / "p.png", 8), torch.ones(3, 8, 8))
    img = Image.new("RGB", (8, 4), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 4, 4))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90° clockwise
    img.save(tmp_path / "r.jpg", exif=exif, quality=100)
    with Image.open(tmp_path / "r.jpg") as raw:
        assert raw.size == (8, 4)
    upright = load_image(tmp_path / "r.jpg", 4)  # shorter side 4: the full 4x8 upright image
    assert upright[:, :2].mean() > 0.9 and upright[:, 2:].mean() < 0.1  # white on top


def test_caption_rules(bad_folder, tmp_path):
    lines, notes = read_caption_file(bad_folder / "latin1.txt")
    assert lines == ["caf\ufffd au lait"] and "not valid UTF-8" in notes[0]
    lines, notes = read_caption_file(bad_folder / "utf16.txt")
    assert lines == ["a red circle"] and notes == ["UTF-16 caption decoded"]
    lines, notes = read_caption_file(bad_folder / "long.txt")
    assert len(lines[0]) == MAX_CAPTION_CHARS and "cut" in notes[0]
    (tmp_path / "bom.txt").write_bytes("\ufeffhello\r\n\r\nworld".encode())
    assert read_caption_file(tmp_path / "bom.txt") == (["hello", "world"], [])
    assert read_caption_file(tmp_path / "missing.txt")[0] == []


def test_overlong_caption_is_truncated_by_the_tokenizer():
    from dalle1.text import TextTokenizer

    tok = TextTokenizer.train(["a red circle", "a blue square"] * 10, 280, text_len=6)
    long = "a red circle " * 50
    assert tok.encode(long).shape == (1, 6) and tok.num_tokens(long) > 6
    assert tok.count_truncated([long, "a red circle"]) == 1


def test_bad_images_raise_one_error_type(bad_folder):
    for stem, reason in [
        ("truncated", "truncated"),
        ("notimage", "not an image"),
        ("empty_image", "not an image"),
    ]:
        with pytest.raises(BadImageError, match=reason) as info:
            load_image(bad_folder / f"{stem}.png", SIZE)
        assert str(bad_folder / f"{stem}.png") in str(info.value)
    with pytest.raises(BadImageError, match="file not found") as info:
        load_image(bad_folder / "nope.png", SIZE)
    err = info.value
    assert (err.path, err.reason) == (str(bad_folder / "nope.png"), "file not found")
    assert str(err) == f"{bad_folder / 'nope.png'}: file not found"
    again = pickle.loads(pickle.dumps(err))  # crosses DataLoader worker processes intact
    assert (again.path, again.reason, str(again)) == (err.path, err.reason, str(err))
    assert str(BadImageError(None, "no image can be used")) == "no image can be used"


# --- skip and count ----------------------------------------------------------------------


def test_folder_skips_and_counts_every_bad_file(bad_folder):
    problems = DataProblems()
    ds = CaptionedFolder(bad_folder, SIZE, problems=problems)
    stems = {p.stem for p, _ in ds.pairs}
    # header scan drops what cannot be opened and empty/missing captions; truncation needs decoding
    assert stems.isdisjoint(SKIPPED - {"truncated"}) and "truncated" in stems
    seen = [ds[i] for i in range(len(ds))]  # never raises
    assert all(img.shape == (3, SIZE, SIZE) for img, _ in seen)
    skipped = {Path(p.path).stem: p.reason for p in problems.skipped()}
    assert set(skipped) == SKIPPED
    assert skipped["truncated"] == "truncated file"
    assert skipped["nocaption"] == "no same-stem .txt caption"
    assert skipped["emptycaption"] == "empty caption"
    converted = {(Path(p.path).stem, p.reason) for p in problems.read() if p.action == "converted"}
    assert ("gray", "grayscale image converted to RGB") in converted
    assert ("rgba", "transparency composited on white") in converted
    assert ("palette", "palette image converted to RGB") in converted
    assert ("sixteen", "16-bit image scaled to 8 bits") in converted
    assert ("small", f"smaller than {SIZE}px: upscaled") in converted
    assert ("latin1", "caption not valid UTF-8: bad bytes replaced by U+FFFD") in converted
    # the truncated image's draw was replaced by the next decodable image and its caption
    t = next(i for i, (p, _) in enumerate(ds.pairs) if p.stem == "truncated")
    image, caption = ds[t]
    assert (
        torch.equal(image, ds[(t + 1) % len(ds)][0]) and caption in ds.captions[(t + 1) % len(ds)]
    )
    summary = problems.summary()
    assert summary.startswith("5 files skipped") and "truncated file: 1" in summary


def test_worker_processes_report_to_the_main_process(bad_folder, tmp_path):
    problems = DataProblems(tmp_path / "log.jsonl")
    ds = CaptionedFolder(bad_folder, SIZE, problems=problems)
    loader = DataLoader(ds, batch_size=4, num_workers=2)
    n = sum(len(images) for images, _ in loader)
    assert n == len(ds)
    assert "truncated" in {Path(p.path).stem for p in problems.skipped()}  # read from the file


def test_all_images_bad_is_one_clear_error(tmp_path):
    full = png_bytes(noisy_rgb(0, size=64))
    write_pair(tmp_path, "a", full[: len(full) // 2], b"cap\n")
    ds = CaptionedFolder(tmp_path, SIZE, problems=DataProblems())  # the header reads fine
    with pytest.raises(BadImageError, match="none of the 1 images of the dataset can be decoded"):
        ds[0]
    write_pair(tmp_path, "a", full[:40], b"cap\n")
    with pytest.raises(BadImageError, match="none of the 1 listed images can be used: 1 files"):
        CaptionedFolder(tmp_path, SIZE, problems=DataProblems())


def test_training_survives_bad_data_and_reports_it(bad_folder, tmp_path, capfd):
    out = tmp_path / "run"
    cfg = load_config(
        "configs/tiny_vae.yaml",
        [
            f"data.path={bad_folder}",
            f"train.out_dir={out}",
            "data.val_fraction=0",
            "data.batch_size=4",
            "train.max_steps=6",
            "train.ckpt_every=3",
        ],
    )
    assert (fit(cfg) / "vae" / "model.safetensors").exists()
    err = capfd.readouterr().err
    assert "dalle1: data (before training): 4 files skipped" in err
    assert "truncated file" in err  # found while decoding, reported at an epoch's end
    rows = list(csv.DictReader(open(out / "logs" / "metrics.csv")))
    assert max(float(r["data_skipped_files"] or 0) for r in rows) == 5
    assert len(DataProblems(out / "data_problems.jsonl").skipped()) == 5


def test_data_check_cli(bad_folder, capsys):
    with pytest.raises(SystemExit) as info:
        main(["data", "check", str(bad_folder), "--image-size", str(SIZE)])
    assert info.value.code == 1
    out = capsys.readouterr().out
    for stem in SKIPPED:
        assert f"SKIPPED   {bad_folder / stem}.png" in out
    assert f"CONVERTED {bad_folder / 'small'}.png: smaller than 16px: upscaled" in out
    assert "14 usable image/caption pairs; 5 files would be skipped" in out
    usable, problems = check_folder(bad_folder, progress=False)
    assert usable == 14 and len(problems.skipped()) == 5


def test_data_check_clean_folder_exits_zero(tmp_path, capsys):
    make_shapes_dataset(tmp_path, count=3, image_size=SIZE, progress=False)
    assert main(["data", "check", str(tmp_path)]) == 0
    assert "3 usable image/caption pairs; 0 files would be skipped" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "nope")]) == 2


# --- clear errors at the boundary --------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["vae.fsq_levels=[4, x]"], "vae.fsq_levels[1]: expected int, got str"),
        (["vae.fsq_levels=4"], "vae.fsq_levels: expected a list, got int"),
        (["data=5"], "data: expected a mapping, got int"),
        (["train.max_step=5"], "unknown key 'train.max_step'; allowed keys: stage, out_dir"),
        (["trian.lr=1"], "unknown key 'trian'; allowed keys: data, text, vae"),
        (["train.lr=fast"], "train.lr: expected float, got str"),
        (["train.progress_bar=3"], "train.progress_bar: expected bool, got int"),
        (["train.nan_policy=ignore"], "train.nan_policy: 'ignore' is not one of stop, skip"),
        (["train.lr.x=1"], "train.lr: expected float, got dict"),
        (["train=5", "train.lr=1"], "'train' is not a section"),
    ],
)
def test_config_errors_name_key_and_type(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_config_file_errors(tmp_path):
    (tmp_path / "latin.yaml").write_bytes(b"train:\n  out_dir: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "latin.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_pipeline_rejects_bad_prompts_and_counts(tiny_model):
    from dalle1.pipeline import DALLEPipeline

    pipe = DALLEPipeline.from_pretrained(tiny_model)
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        pipe("")
    with pytest.raises(ValueError, match="num_images must be >= 1, got 0"):
        pipe("a red circle", num_images=0)
    with pytest.raises(ValueError, match="no prompt given"):
        pipe([])


def test_model_folder_mismatch_names_both_numbers(tiny_model, tmp_path):
    from dalle1.checkpoint import read_json, write_json

    bad = tmp_path / "model"
    shutil.copytree(tiny_model, bad)
    cfg = read_json(bad / "dalle" / "config.json")
    cfg["stream"]["image_vocab"] += 5
    write_json(bad / "dalle" / "config.json", cfg)
    with pytest.raises(ModelFolderError) as info:
        load_parts(bad)
    assert "do not fit" in str(info.value)
    # every part loads, but the VAE comes from another model with a bigger codebook
    shutil.rmtree(bad)
    shutil.copytree(tiny_model, bad)
    vae = load_vae(bad / "vae")
    other = DiscreteVAE(dataclasses.replace(vae.cfg, codebook_size=vae.codebook_size * 2))
    save_vae(other, bad / "vae")
    with pytest.raises(ModelFolderError) as info:
        load_parts(bad)
    assert str(info.value) == (
        f"model folder parts disagree: transformer image vocabulary = {vae.codebook_size} "
        f"but VAE codebook size = {vae.codebook_size * 2}"
    )


# --- NaN / Inf ------------------------------------------------------------------------------


def test_check_loss_policies():
    assert check_loss(torch.tensor(1.5), "stop", 3)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 7"):
        check_loss(torch.tensor(float("nan")), "stop", 7)
    assert not check_loss(torch.tensor(float("inf")), "skip", 7)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_loss_in_training(policy, shapes_dir, tmp_path, monkeypatch, capfd):
    import lightning as L

    from dalle1.training.systems import VAEModule

    real = VAEModule.training_step

    def poisoned(self, batch, batch_idx):
        loss = real(self, batch, batch_idx)
        return loss * float("nan") if self.global_step == 2 else loss

    monkeypatch.setattr(VAEModule, "training_step", poisoned)
    weights = {}

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            weights[trainer.global_step] = {
                k: v.clone() for k, v in module.state_dict().items() if "weight" in k
            }

    cfg = load_config(
        "configs/tiny_vae.yaml",
        [
            f"data.path={shapes_dir}",
            f"train.out_dir={tmp_path}",
            "train.max_steps=4",
            f"train.nan_policy={policy}",
        ],
    )
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 2 \(epoch 0, batch 2\)"):
            fit(cfg, callbacks=[Watch()])
        assert max(weights) == 2  # steps 1 and 2 trained, nothing after
        assert main(["train", "--config", "configs/tiny_vae.yaml", "--overwrite", *_cli(cfg)]) == 2
        assert "error: training loss is nan at step 2" in capfd.readouterr().err
    else:
        fit(cfg, callbacks=[Watch()])
        assert sorted(weights) == [1, 2, 3, 4]
        for k in weights[2]:  # the poisoned batch changed no weight
            assert torch.equal(weights[2][k], weights[3][k]), k
        assert any(not torch.equal(weights[3][k], weights[4][k]) for k in weights[3])
        assert "skipped (train.nan_policy=skip)" in capfd.readouterr().err


def _cli(cfg) -> list[str]:
    return [
        f"data.path={cfg.data.path}",
        f"train.out_dir={cfg.train.out_dir}",
        "train.max_steps=4",
        f"train.nan_policy={cfg.train.nan_policy}",
    ]


# --- crash-safe files and no code execution on load --------------------------------------------


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_without_running(tmp_path, shapes_dir):
    marker = tmp_path / "PWNED"
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}, "x": Payload(marker)}, out / "checkpoints" / "last.ckpt")
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Payload(marker)))
    # the payload is live: plain pickle would run it (checked on a copy of the marker path)
    probe = tmp_path / "PROBE"
    pickle.loads(pickle.dumps(Payload(probe)))
    assert probe.exists()
    with pytest.raises(CheckpointError, match="unsupported GLOBAL posix.system"):
        safe_torch_load(out / "checkpoints" / "last.ckpt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "evil.pt")
    cfg = load_config("configs/tiny_vae.yaml", [f"data.path={shapes_dir}", f"train.out_dir={out}"])
    with pytest.raises(CheckpointError, match="refusing to load"):
        fit(cfg, resume=True)
    assert not marker.exists()


def test_malicious_model_folder_weights_are_refused(tiny_model, tmp_path):
    marker = tmp_path / "PWNED"
    bad = tmp_path / "model"
    shutil.copytree(tiny_model, bad)
    (bad / "vae" / "model.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ModelFolderError, match="not a valid safetensors file"):
        load_parts(bad)
    assert not marker.exists()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_write(path, lambda fh: fh.write(b"old"))

    def crash(fh):
        fh.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, path)
    assert torch.equal(safe_torch_load(path)["w"], torch.ones(2))


def test_sampler_order_is_a_function_of_seed_and_pass():
    a, b = ResumableSampler(10, seed=3), ResumableSampler(10, seed=3)
    first, second = list(a), list(a)
    assert sorted(first) == list(range(10)) and first != second
    b.next_epoch, b.skip = 1, 4  # resume the second pass after 4 samples
    rest = list(b)
    assert rest == second[4:] and [i.seed for i in rest] == [i.seed for i in second[4:]]
    assert pickle.loads(pickle.dumps(rest[0])).seed == rest[0].seed


def test_find_pairs_records_orphans(tmp_path):
    make_shapes_dataset(tmp_path, count=2, image_size=SIZE, progress=False)
    (tmp_path / "000001.txt").unlink()
    problems = DataProblems()
    assert len(find_pairs(tmp_path, problems)) == 1
    assert [Path(p.path).name for p in problems.skipped()] == ["000001.png"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
