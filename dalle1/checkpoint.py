"""Model folders: a trained model is a self-contained directory that loads with one call.

    model/
      config.json            the full dalle1 config that trained it (all sections)
      tokenizer.json         the BPE text tokenizer (tokenizers' own JSON)
      vae/config.json        VAEConfig
      vae/model.safetensors
      dalle/config.json      DALLEConfig + the stream shape (vocabularies, lengths, grid)
      dalle/model.safetensors
      clip/config.json       optional reranker (dalle1.clip.CLIPScorer) + its text shape
      clip/model.safetensors

Weights are only ever read with safetensors (no pickle, so no code runs on
load); configs and the tokenizer are parsed as JSON. Folders are written under
a temporary name and renamed into place, so a crash never leaves half a model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from .clip import CLIPScorer
from .config import CLIPConfig, Config, DALLEConfig, VAEConfig, build_section, config_from_dict
from .files import atomic_folder
from .text import TextTokenizer
from .transformer import DALLE, StreamShape
from .vae import DiscreteVAE


class ModelFolderError(ValueError):
    """A model folder is missing a part, or its parts do not fit together."""


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def read_json(path: Path) -> dict:
    if not path.exists():
        raise ModelFolderError(f"missing file '{path}'")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"'{path}' is not valid JSON ({err})") from None


def save_component(module: torch.nn.Module, config: dict, folder: Path) -> None:
    """``folder/config.json`` + ``folder/model.safetensors`` (save_model handles tied weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", config)
    save_model(module, str(folder / "model.safetensors"))


def load_weights(module: torch.nn.Module, folder: Path) -> torch.nn.Module:
    path = folder / "model.safetensors"
    if not path.exists():
        raise ModelFolderError(f"missing weights '{path}'")
    try:
        load_model(module, str(path), strict=True, device="cpu")
    except RuntimeError as err:  # shapes in the weights disagree with config.json
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise ModelFolderError(
            f"weights '{path}' do not fit '{folder / 'config.json'}': {detail}"
        ) from None
    except Exception as err:  # noqa: BLE001 - e.g. SafetensorError: a pickle, a truncated file
        raise ModelFolderError(
            f"weights '{path}' are not a valid safetensors file ({err})"
        ) from None
    return module


# --- components ---------------------------------------------------------------------------


def component_folder(folder: str | Path, name: str) -> Path:
    """``folder/name`` (a part of a model folder) when it exists, else ``folder`` itself.

    So ``load_vae`` (``name="vae"``) and ``load_clip`` accept a whole model folder or
    just its part.
    """
    folder = Path(folder)
    return folder / name if (folder / name).is_dir() else folder


def save_vae(vae: DiscreteVAE, folder: Path) -> None:
    save_component(vae, asdict(vae.cfg), folder)


def load_vae(folder: str | Path) -> DiscreteVAE:
    sub = component_folder(folder, "vae")
    cfg = build_section(VAEConfig, read_json(sub / "config.json"), "vae.")
    return load_weights(DiscreteVAE(cfg), sub).eval()


def save_dalle(model: DALLE, folder: Path) -> None:
    save_component(model, {**asdict(model.cfg), "stream": asdict(model.shape)}, folder)


def load_dalle(folder: Path) -> DALLE:
    data = read_json(folder / "config.json")
    shape = StreamShape(**data.pop("stream"))
    cfg = build_section(DALLEConfig, data, "dalle.")
    return load_weights(DALLE(cfg, shape), folder).eval()


def export_model(
    out: str | Path,
    config: Config,
    vae: DiscreteVAE,
    dalle: DALLE | None = None,
    tokenizer: TextTokenizer | None = None,
    extra: dict[str, torch.nn.Module] | None = None,
) -> Path:
    """Write a complete model folder atomically."""
    with atomic_folder(out) as tmp:
        config.save_json(tmp / "config.json")
        save_vae(vae, tmp / "vae")
        if dalle is not None:
            save_dalle(dalle, tmp / "dalle")
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
        for name, module in (extra or {}).items():
            save_component(module, getattr(module, "export_config", dict)(), tmp / name)
    return Path(out)


def load_clip(folder: str | Path) -> CLIPScorer:
    """Load ``folder/clip`` (or ``folder`` itself when it holds the clip's config.json)."""
    sub = component_folder(folder, "clip")
    data = read_json(sub / "config.json")
    try:
        shape = {k: data.pop(k) for k in ("text_vocab", "text_len", "bpe_vocab", "image_size")}
    except KeyError as err:
        raise ModelFolderError(f"'{sub / 'config.json'}' lacks the key {err}") from None
    cfg = build_section(CLIPConfig, data, "clip.")
    return load_weights(CLIPScorer(cfg, **shape), sub).eval()


def check_clip_fits(clip: CLIPScorer, tokenizer: TextTokenizer) -> None:
    """Raise ModelFolderError when the scorer reads another text shape than the tokenizer."""
    for name, a, b in (
        ("text vocabulary", clip.text_vocab, tokenizer.vocab_size),
        ("text length", clip.text_len, tokenizer.text_len),
    ):
        if a != b:
            raise ModelFolderError(
                f"model folder parts disagree: clip {name} = {a} but tokenizer {name} = {b}"
            )


def save_clip(clip: CLIPScorer, model: str | Path) -> Path:
    """Add (or replace) ``model/clip`` atomically; nothing else in the folder changes."""
    with atomic_folder(Path(model) / "clip") as tmp:
        save_component(clip, clip.export_config(), tmp)
    return Path(model) / "clip"


def load_config_json(folder: str | Path) -> Config:
    data = read_json(Path(folder) / "config.json")
    known = {f.name for f in fields(Config)}
    return config_from_dict({k: v for k, v in data.items() if k in known})


def check_fit(vae: DiscreteVAE, dalle: DALLE, tokenizer: TextTokenizer) -> None:
    """Raise ModelFolderError naming both numbers when the parts of a folder disagree."""
    s = dalle.shape
    pairs = [
        ("transformer image vocabulary", s.image_vocab, "VAE codebook size", vae.codebook_size),
        ("transformer image grid", s.grid, "VAE grid", vae.grid_size),
        (
            "transformer text vocabulary",
            s.text_vocab,
            "tokenizer vocabulary (BPE + pads)",
            tokenizer.vocab_size,
        ),
        ("transformer text length", s.text_len, "tokenizer text length", tokenizer.text_len),
        ("transformer <bos> id", s.bos_id, "tokenizer <bos> id", tokenizer.bos_id),
    ]
    for name_a, a, name_b, b in pairs:
        if a != b:
            raise ModelFolderError(
                f"model folder parts disagree: {name_a} = {a} but {name_b} = {b}"
            )


def load_parts(folder: str | Path) -> tuple[Config, DiscreteVAE, DALLE, TextTokenizer]:
    """Load and cross-check every part of a complete model folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder '{folder}' does not exist")
    config = load_config_json(folder)
    vae = load_vae(folder / "vae")
    dalle = load_dalle(folder / "dalle")
    if not (folder / "tokenizer.json").exists():
        raise ModelFolderError(f"missing file '{folder / 'tokenizer.json'}'")
    tokenizer = TextTokenizer.load(folder / "tokenizer.json", dalle.shape.text_len)
    check_fit(vae, dalle, tokenizer)
    return config, vae, dalle, tokenizer
