"""Folder, manifest (JSONL / CSV) and WebDataset shards give the same data; codes; emoji."""

from __future__ import annotations

import csv
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle1.checkpoint import load_vae
from dalle1.cli import main
from dalle1.codes import CodesFile
from dalle1.config import DataConfig, load_config
from dalle1.data import (
    CaptionedFolder,
    ShardDataset,
    data_format,
    find_pairs,
    load_pairs,
)
from dalle1.data.emoji import find_font, make_emoji_dataset, parse_emoji_test
from dalle1.data.manifest import read_manifest, write_manifest
from dalle1.data.shards import iter_tar_samples, shard_paths
from dalle1.evaluation import encode_dataset
from dalle1.training import fit

N = 13  # samples; not a multiple of the shard size, so the last shard is short


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """N random images (PNG and JPEG) with two unique caption lines each."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for i in range(N):
        pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)  # not square: cropped
        suffix = ".jpg" if i % 4 == 0 else ".png"
        Image.fromarray(pixels).save(root / f"img{i:02d}{suffix}")
        (root / f"img{i:02d}.txt").write_text(f"item {i}\npicture number {i}\n")
    return root


def as_table(dataset) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """first caption line -> (image, all lines), for any reader."""
    if isinstance(dataset, CaptionedFolder):
        rows = [(dataset[i][0], dataset.captions[i]) for i in range(len(dataset))]
    else:
        rows = list(dataset)
    return {lines[0]: (image, lines) for image, lines in rows}


def write_csv(pairs, path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file_name", "text"])
        for image, captions in pairs:
            rel = os.path.relpath(image, path.parent)  # relative to the manifest
            writer.writerow([rel, "\n".join(captions)])


def test_every_format_yields_the_same_pairs(folder, tmp_path):
    pairs = find_pairs(folder)
    jsonl = write_manifest(pairs, tmp_path / "m" / "metadata.jsonl")
    csv_path = tmp_path / "c" / "data.csv"
    csv_path.parent.mkdir()
    write_csv([(i, c.read_text().strip().splitlines()) for i, c in pairs], csv_path)
    assert main(["data", "shard", str(folder), str(tmp_path / "shards"), "--shard-size", "5"]) == 0

    configs = {
        "folder": DataConfig(path=str(folder)),
        "manifest": DataConfig(path=str(jsonl.parent)),  # a folder holding metadata.jsonl
        "csv": DataConfig(path=str(csv_path)),
        "webdataset": DataConfig(path=str(tmp_path / "shards")),
    }
    assert [data_format(c) for c in configs.values()] == [
        "folder",
        "manifest",
        "manifest",
        "webdataset",
    ]
    tables = {}
    for name, cfg in configs.items():
        if name == "webdataset":
            tables[name] = as_table(ShardDataset(cfg.path, 16, all_captions=True))
        else:
            tables[name] = as_table(CaptionedFolder(None, 16, load_pairs(cfg)))
    reference = tables.pop("folder")
    assert len(reference) == N
    for name, table in tables.items():
        assert table.keys() == reference.keys(), name
        for key, (image, lines) in reference.items():
            assert image.shape == (3, 16, 16)
            assert torch.equal(table[key][0], image), (name, key)
            assert table[key][1] == lines == [key, f"picture number {key.split()[1]}"]


def test_shards_round_trip(folder, tmp_path):
    pairs = find_pairs(folder)
    assert main(["data", "shard", str(folder), str(tmp_path), "--shard-size", "5"]) == 0
    shards = shard_paths(tmp_path)
    assert [p.name for p in shards] == [f"shard-{i:06d}.tar" for i in range(3)]
    assert shard_paths(str(tmp_path / "shard-{000000..000002}.tar")) == shards
    assert shard_paths(str(tmp_path / "shard-*.tar")) == shards
    samples = [s for shard in shards for s in iter_tar_samples(shard)]
    assert len(samples) == N and [len(list(iter_tar_samples(s))) for s in shards] == [5, 5, 3]
    for (_key, sample), (image, caption) in zip(samples, pairs):
        ext = "jpg" if image.suffix == ".jpg" else "png"
        assert set(sample) == {ext, "txt"}
        assert sample[ext] == image.read_bytes()  # original bytes, not re-encoded
        assert sample["txt"].decode().splitlines() == caption.read_text().splitlines()
    with tarfile.open(shards[0]) as tar:  # a plain tar that any WebDataset reader can open
        assert tar.getnames()[:2] == ["00000000.jpg", "00000000.txt"]


def test_shard_stream_shuffles_splits_and_repeats(folder, tmp_path, monkeypatch):
    write = ["data", "shard", str(folder), str(tmp_path / "s"), "--shard-size", "4"]
    assert main(write) == 0  # 4 shards: 4 + 4 + 4 + 1
    path = tmp_path / "s"
    every = {lines[0] for _, lines in ShardDataset(path, 8, all_captions=True)}
    assert len(every) == N

    # the buffer shuffle reorders, loses nothing, and is reproducible
    def order(**kw) -> list[str]:
        return [lines[0] for _, lines in ShardDataset(path, 8, all_captions=True, **kw)]

    shuffled = order(shuffle_buffer=5, seed=1)
    assert shuffled == order(shuffle_buffer=5, seed=1) != order()
    assert sorted(shuffled) == sorted(every) and shuffled != order(shuffle_buffer=5, seed=2)
    # held-out and training samples partition the stream
    val = {
        lines[0]
        for _, lines in ShardDataset(path, 8, split="val", val_fraction=0.3, all_captions=True)
    }
    train = {
        lines[0]
        for _, lines in ShardDataset(path, 8, split="train", val_fraction=0.3, all_captions=True)
    }
    assert val and train and not val & train and val | train == every
    # ranks read disjoint parts that cover everything: by shard (4 shards >= 2 readers) and,
    # with one shard for 2 readers, by sample
    for spec in (path, path / "shard-000000.tar"):
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "1")
        expected = {lines[0] for _, lines in ShardDataset(spec, 8, all_captions=True)}
        seen = []
        for rank in range(2):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            seen.append({lines[0] for _, lines in ShardDataset(spec, 8, all_captions=True)})
        assert seen[0] and seen[1] and not seen[0] & seen[1] and seen[0] | seen[1] == expected
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    # DataLoader workers split the stream too
    data = ShardDataset(path, 8, all_captions=True)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=2)
    assert sorted(lines[0] for _, lines in loader) == sorted(every)
    # repeat: an endless stream that passes over every sample again
    stream = iter(ShardDataset(path, 8, repeat=True, shuffle_buffer=3, all_captions=True))
    first_passes = [next(stream)[1][0] for _ in range(3 * N)]
    assert {c: first_passes.count(c) for c in first_passes} == {c: 3 for c in every}


def test_manifest_errors_name_the_problem(folder, tmp_path):
    manifest = tmp_path / "metadata.jsonl"
    rows = [
        {"file_name": str(folder / "img01.png"), "text": "ok"},
        {"file_name": "gone.png", "text": "x"},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        FileNotFoundError, match=r"metadata.jsonl:2: image '.*gone.png' does not exist"
    ):
        read_manifest(manifest)
    code = main(["data", "shard", str(manifest), str(tmp_path / "out")])
    assert code == 2
    manifest.write_text(json.dumps({"file_name": "img01.png"}) + "\n")
    with pytest.raises(ValueError, match="metadata.jsonl:1: missing the 'text' column"):
        read_manifest(manifest)
    with pytest.raises(FileNotFoundError, match="shard '.*nope.tar' does not exist"):
        shard_paths(tmp_path / "nope.tar")


def test_pre_encoded_codes_equal_on_the_fly(tiny_model, shapes_dir, tmp_path):
    vae = load_vae(tiny_model)
    on_the_fly = encode_dataset(vae, CaptionedFolder(shapes_dir, 16), progress=False)
    out = tmp_path / "codes"
    assert (
        main(
            [
                "data",
                "encode",
                "--model",
                str(tiny_model),
                "--data",
                str(shapes_dir),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    store = CodesFile(out)
    assert store.codes.dtype == np.int16 and isinstance(store.codes, np.memmap)
    assert torch.equal(store.tensor(), on_the_fly)
    assert store.captions == CaptionedFolder(shapes_dir, 16).captions
    # the same codes from shards of the same images
    assert main(["data", "shard", str(shapes_dir), str(tmp_path / "sh"), "--shard-size", "20"]) == 0
    main(
        [
            "data",
            "encode",
            "--model",
            str(tiny_model),
            "--data",
            str(tmp_path / "sh"),
            "--out",
            str(tmp_path / "c2"),
        ]
    )
    assert torch.equal(CodesFile(tmp_path / "c2").tensor(), on_the_fly)

    # the transformer trains from the stored codes, with no images in sight
    cfg = load_config(
        "configs/tiny_dalle.yaml",
        [
            "data.path=does/not/exist",
            "data.synthetic_count=0",
            f"data.codes={out}",
            f"dalle.vae={tiny_model}",
            f"train.out_dir={tmp_path / 'run'}",
            "train.max_steps=2",
        ],
    )
    model = fit(cfg)
    assert (model / "dalle" / "model.safetensors").is_file()
    assert set(json.loads((tmp_path / "run" / "metrics.json").read_text())) == {
        "val_text_bits_per_token",
        "val_image_bits_per_token",
    }
    # codes made by another VAE are refused
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "vae_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="made by another VAE"):
        fit(cfg, overwrite=True)


def test_both_stages_train_on_shards(shapes_dir, tmp_path):
    shards = tmp_path / "shards"
    assert main(["data", "shard", str(shapes_dir), str(shards), "--shard-size", "16"]) == 0
    common = [f"data.path={shards}", "data.format=webdataset", "data.shuffle_buffer=8"]
    common += ["train.max_steps=2"]  # tiny_*.yaml's synthetic_count is ignored for shards
    vae_cfg = load_config("configs/tiny_vae.yaml", [*common, f"train.out_dir={tmp_path / 'v'}"])
    vae = fit(vae_cfg)
    assert "psnr" in json.loads((tmp_path / "v" / "metrics.json").read_text())
    dalle_cfg = load_config(
        "configs/tiny_dalle.yaml", [*common, f"train.out_dir={tmp_path / 'd'}", f"dalle.vae={vae}"]
    )
    assert (fit(dalle_cfg) / "tokenizer.json").is_file()
    # nothing generated there: the three shards and their list
    assert sorted(p.name for p in shards.iterdir()) == [
        *(f"shard-{k:06d}.tar" for k in range(3)),
        "shards.json",
    ]


def test_emoji_list_and_missing_font(tmp_path):
    text = (
        "# group: Smileys & Emotion\n"
        "1F600 ; fully-qualified # 😀 E1.0 grinning face\n"
        "263A FE0F ; fully-qualified # ☺️ E0.6 smiling face\n"
        "263A ; unqualified # ☺ E0.6 smiling face\n"
        "1F44D 1F3FD ; fully-qualified # 👍🏽 E1.0 thumbs up: medium skin tone\n"
        "1F3FB ; component # 🏻 E1.0 light skin tone\n"
    )
    items = parse_emoji_test(text)
    assert [(e.stem, e.name) for e in items] == [
        ("1f600", "grinning face"),
        ("263a", "smiling face"),
        ("1f44d_1f3fd", "thumbs up: medium skin tone"),
    ]
    with pytest.raises(FileNotFoundError, match="fonts-noto-color-emoji"):
        find_font(tmp_path / "NoSuchFont.ttf")
    assert main(["data", "emoji", str(tmp_path / "e"), "--font", str(tmp_path / "x.ttf")]) == 2


def _has_font() -> bool:
    try:
        find_font()
    except FileNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _has_font(), reason="needs the Debian package fonts-noto-color-emoji")
def test_emoji_renders_with_captions(tmp_path):
    test = tmp_path / "emoji-test.txt"
    test.write_text(
        "1F600 ; fully-qualified # 😀 E1.0 grinning face\n"
        "1F469 200D 1F680 ; fully-qualified # 👩‍🚀 E4.0 woman astronaut\n"
        "1F1FA 1F1F8 ; fully-qualified # 🇺🇸 E2.0 flag: United States\n"
        "E000 ; fully-qualified # ? E0.0 private use, not in the font\n"
    )
    assert make_emoji_dataset(tmp_path / "out", 24, test_path=test, progress=False) == 3
    data = CaptionedFolder(tmp_path / "out", 24)
    names = sorted(c for lines in data.captions for c in lines)
    assert names == ["flag: United States", "grinning face", "woman astronaut"]
    for image, _ in (data[i] for i in range(len(data))):
        assert image.shape == (3, 24, 24)
        assert image[:, 0, 0].min() > 0.95  # white corner
        assert (image.max(0).values - image.min(0).values).max() > 0.3  # colour in the middle
