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

A model folder is a unit of trust: every file is read through
:func:`dalle1.files.read_text` / :func:`~dalle1.files.regular_file` with the
folder as the root (regular files only, size caps, symlinks must stay inside).
Each part's config is validated like a YAML config (types, ranges, the keys
that shape the weights must be present) and sized before its model is built:
a config that describes far more weights than its ``model.safetensors`` holds is
refused before anything is allocated, and weights holding NaN/Inf are refused
after loading. Every refusal is one :class:`ModelFolderError` line naming the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from .clip import CLIPScorer
from .config import (
    CLIPConfig,
    Config,
    ConfigError,
    DALLEConfig,
    ModelSize,
    VAEConfig,
    build_section,
    check_budget,
    clip_size,
    config_from_dict,
    transformer_size,
    vae_size,
    validate_dalle,
    validate_vae,
)
from .files import UnsafeFileError, atomic_folder, read_text, regular_file
from .text import TextTokenizer
from .transformer import DALLE, StreamShape
from .vae import DiscreteVAE


class ModelFolderError(ValueError):
    """A model folder is missing a part, or its parts do not fit together."""


#: keys of a part's config.json that change the weights or what the model computes: a folder
#: missing one is refused rather than loaded with a default (a silently different model)
VAE_KEYS = (
    "image_size",
    "channels",
    "hidden_dim",
    "num_downsamples",
    "num_res_blocks",
    "codebook_size",
    "codebook_dim",
    "quantizer",
    "recon_loss",
    "vq_cosine",
)
DALLE_KEYS = ("dim", "depth", "heads", "dim_head", "ff_mult", "attention", "conv_kernel")
CLIP_KEYS = (
    "dim",
    "depth",
    "heads",
    "dim_head",
    "embed_dim",
    "image_channels",
    "image_downsamples",
)
CLIP_SHAPE_KEYS = ("text_vocab", "text_len", "bpe_vocab", "image_size")
#: default ``train.max_model_gb`` for a part loaded on its own
DEFAULT_MAX_MODEL_GB = Config().train.max_model_gb


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    for k in keys:
        if keys.count(k) > 1:
            raise ValueError(f"key '{k}' is given twice")
    return dict(pairs)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number a config may hold")


def read_json(path: Path, root: Path | None = None) -> dict:
    """A JSON object from a model folder: a regular file of at most 4 MiB (inside ``root``),
    UTF-8, no key twice, no NaN / Infinity, not nested absurdly deep."""
    try:
        text = read_text(path, "config", root)
    except FileNotFoundError:
        raise ModelFolderError(f"missing file '{path}'") from None
    except UnsafeFileError as err:
        raise ModelFolderError(str(err)) from None
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"'{path}' is not valid JSON ({err})") from None
    except RecursionError:
        raise ModelFolderError(f"'{path}' is nested too deeply to be a config") from None
    except ValueError as err:
        raise ModelFolderError(f"'{path}': {err}") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"'{path}' must hold a JSON object, got {type(data).__name__}")
    return data


def part_config(cls: type, data: dict, prefix: str, required: tuple, path: Path) -> object:
    """A part's config dataclass from its config.json; ConfigError -> one line naming the file."""
    try:
        return build_section(cls, data, prefix, required)
    except ConfigError as err:
        raise ModelFolderError(f"'{path}': {err}") from None


def _checked(path: Path, check) -> None:
    try:
        check()
    except ConfigError as err:
        raise ModelFolderError(f"'{path}': {err}") from None


def check_size(folder: Path, size: ModelSize, root: Path | None, limit_gb: float) -> Path:
    """Before a part is built: its config's size within the budget and not far beyond what its
    ``model.safetensors`` holds (weights take >= 2 bytes each; a config asking for more is
    not the one these weights belong to). Returns the checked weights path."""
    config_path = folder / "config.json"
    _checked(config_path, lambda: check_budget(size, limit_gb, str(config_path)))
    path = folder / "model.safetensors"
    try:
        weights = regular_file(path, "weights", root)
    except FileNotFoundError:
        raise ModelFolderError(f"missing weights '{path}'") from None
    except UnsafeFileError as err:
        raise ModelFolderError(str(err)) from None
    stored = weights.stat().st_size
    if size.values > 2 * stored + 1_000_000:
        raise ModelFolderError(
            f"'{config_path}' describes a model of ~{size.values:,} weights but '{path}' holds "
            f"only {stored:,} bytes: the config and the weights do not belong together"
        )
    return weights


def check_finite(module: torch.nn.Module, path: Path) -> None:
    """ModelFolderError naming the first tensor of ``module`` that holds NaN or Inf."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelFolderError(
                f"weights '{path}' hold {bad} NaN/Inf values in '{name}': the model is broken "
                "(a diverged run); retrain it or use another folder"
            )


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
    check_finite(module, path)
    return module


def load_tokenizer(
    path: Path, text_len: int, bpe_dropout: float = 0.0, root: Path | None = None
) -> TextTokenizer:
    """``tokenizer.json`` (a regular file of at most 256 MiB, inside ``root``), one-line errors."""
    try:
        return TextTokenizer.load(path, text_len, bpe_dropout, root=root)
    except FileNotFoundError:
        raise ModelFolderError(f"missing file '{path}'") from None
    except UnsafeFileError as err:
        raise ModelFolderError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - the tokenizers library raises a bare Exception
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ModelFolderError(
            f"'{path}' is not a tokenizer the tokenizers library can read ({detail})"
        ) from None


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


def load_vae(
    folder: str | Path, root: Path | None = None, limit_gb: float = DEFAULT_MAX_MODEL_GB
) -> DiscreteVAE:
    """The VAE of a model folder (or of its ``vae/`` part); ``root``: the folder of trust."""
    sub = component_folder(folder, "vae")
    root = Path(folder) if root is None else root
    path = sub / "config.json"
    cfg = part_config(VAEConfig, read_json(path, root), "vae.", VAE_KEYS, path)
    _checked(path, lambda: validate_vae(cfg))
    check_size(sub, vae_size(cfg), root, limit_gb)
    return load_weights(DiscreteVAE(cfg), sub).eval()


def save_dalle(model: DALLE, folder: Path) -> None:
    save_component(model, {**asdict(model.cfg), "stream": asdict(model.shape)}, folder)


def load_dalle(
    folder: Path, root: Path | None = None, limit_gb: float = DEFAULT_MAX_MODEL_GB
) -> DALLE:
    path = folder / "config.json"
    data = read_json(path, folder if root is None else root)
    if "stream" not in data:
        raise ModelFolderError(f"'{path}': missing key 'stream'")
    shape = part_config(StreamShape, data.pop("stream"), "stream.", (), path)
    cfg = part_config(DALLEConfig, data, "dalle.", DALLE_KEYS, path)
    _checked(path, lambda: validate_dalle(cfg))
    size = transformer_size(cfg, shape.text_vocab, shape.text_len, shape.image_vocab, shape.grid)
    check_size(folder, size, folder if root is None else root, limit_gb)
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
    path = sub / "config.json"
    data = read_json(path, Path(folder))
    shape = {}
    for key in CLIP_SHAPE_KEYS:
        if key not in data:
            raise ModelFolderError(f"'{path}': missing key 'clip.{key}'")
        value = data.pop(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelFolderError(f"'{path}': clip.{key}={value!r} must be an int >= 1")
        shape[key] = value
    cfg = part_config(CLIPConfig, data, "clip.", CLIP_KEYS, path)
    size = clip_size(cfg, shape["text_vocab"], shape["text_len"], shape["image_size"])
    check_size(sub, size, Path(folder), DEFAULT_MAX_MODEL_GB)
    try:
        clip = CLIPScorer(cfg, **shape)
    except ValueError as err:
        raise ModelFolderError(f"'{path}': {err}") from None
    return load_weights(clip, sub).eval()


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
    path = Path(folder) / "config.json"
    data = read_json(path, Path(folder))
    known = {f.name for f in fields(Config)}
    try:
        return config_from_dict({k: v for k, v in data.items() if k in known})
    except ConfigError as err:
        raise ModelFolderError(f"'{path}': {err}") from None


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
        left = sorted(folder.parent.glob(f".{folder.name}.old-*")) if folder.name else []
        hint = (
            f" (an export killed mid-swap left the previous one as '{left[0]}': rename it "
            f"to '{folder.name}')"
            if left
            else ""
        )
        raise ModelFolderError(f"model folder '{folder}' does not exist{hint}")
    config = load_config_json(folder)
    limit = config.train.max_model_gb
    vae = load_vae(folder / "vae", root=folder, limit_gb=limit)
    dalle = load_dalle(folder / "dalle", root=folder, limit_gb=limit)
    tokenizer = load_tokenizer(folder / "tokenizer.json", dalle.shape.text_len, root=folder)
    check_fit(vae, dalle, tokenizer)
    return config, vae, dalle, tokenizer
