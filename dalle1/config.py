"""Configuration as plain dataclasses, one per section of a YAML file.

A config file has the sections ``data``, ``text``, ``vae``, ``dalle``, ``clip``,
``train`` and ``sample``; ``train.stage`` says which model the file trains. Every number
the paper fixes has a named field here, with the paper's value in the comment
of ``configs/paper_*.yaml``.

Loading is strict: an unknown key names itself and the allowed keys, a wrong
type names the key and the expected type (:class:`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message says which key and why."""


@dataclass
class DataConfig:
    path: str = "data/shapes"  # folder of images + same-stem .txt captions (or a manifest / shards)
    format: str = "auto"  # auto | folder | manifest | webdataset
    image_size: int = 32  # images are resized (and centre-cropped) to this many pixels
    val_fraction: float = 0.05  # held-out share of the data, for validation metrics
    batch_size: int = 32
    num_workers: int = 0
    shuffle_buffer: int = 1000  # webdataset: samples mixed in the streaming shuffle buffer
    codes: str = ""  # `dalle1 data encode` folder: the dalle stage reads codes, not images
    synthetic_count: int = 0  # >0: generate the built-in shapes set at `path` if it is missing
    synthetic_max_shapes: int = 1  # 1 or 2 shapes per built-in image
    seed: int = 0


@dataclass
class TextConfig:
    vocab_size: int = 512  # BPE vocabulary cap, special tokens included (paper: 16384)
    # text positions in the stream (paper: 256); "auto" sizes them from the training captions
    # (the 99th percentile of their token counts plus a margin, see dalle1.text.auto_text_len)
    text_len: int | str = 16
    bpe_dropout: float = 0.0  # paper: 0.1 during training
    lowercase: bool = True  # paper: captions are lowercased


@dataclass
class VAEConfig:
    image_size: int = 32
    channels: int = 3
    hidden_dim: int = 64  # channels after the stem; doubled at every downsampling
    num_downsamples: int = 2  # grid = image_size / 2**num_downsamples (paper: 3, 256 -> 32)
    num_res_blocks: int = 1  # residual blocks per resolution
    codebook_size: int = 256  # image vocabulary (paper: 8192)
    codebook_dim: int = 64  # dimension of a code vector (vq); ignored by gumbel/fsq
    quantizer: str = "vq"  # vq | fsq | gumbel
    recon_loss: str = "mse"  # mse | l1 | logit_laplace
    # vq options (vector-quantize-pytorch VectorQuantize)
    vq_decay: float = 0.99  # EMA decay of the codebook
    vq_commitment_weight: float = 0.25
    vq_kmeans_init: bool = True
    vq_dead_code_threshold: float = 2.0  # replace codes used fewer times than this per batch
    vq_cosine: bool = False  # cosine-similarity codebook
    # fsq options
    fsq_levels: list[int] = field(default_factory=list)  # empty: chosen from codebook_size
    # gumbel options (paper section 2.1 / appendix A.2)
    gumbel_tau_start: float = 1.0
    gumbel_tau_end: float = 1.0 / 16
    gumbel_tau_steps: int = 150_000  # paper: annealed over the first 150k updates
    gumbel_kl_weight: float = 6.6  # paper: beta ramped 0 -> 6.6
    gumbel_kl_steps: int = 5_000  # paper: over the first 5k updates
    gumbel_straight_through: bool = False
    logit_laplace_eps: float = 0.1  # paper: epsilon of the squashed pixel mapping


@dataclass
class DALLEConfig:
    dim: int = 256  # model width (paper: 3968 = 62 heads x 64)
    depth: int = 4  # transformer layers (paper: 64)
    heads: int = 4  # attention heads (paper: 62)
    dim_head: int = 64  # width of one head (paper: 64)
    ff_mult: int = 4
    dropout: float = 0.0
    attention: str = "dense"  # dense | dalle (row/column/conv schedule, paper appendix B.1)
    conv_kernel: int = 11  # side of the convolutional mask (paper: 11)
    text_loss_weight: float = 0.125  # paper: 1/8 text, 7/8 image
    p_uncond: float = 0.0  # caption dropout for classifier-free guidance
    vae: str = ""  # model folder holding the trained image tokenizer


@dataclass
class CLIPConfig:
    model: str = ""  # model folder (trained transformer) to add clip/ to; its tokenizer is used
    dim: int = 128  # text transformer width (and the image encoder's hidden width)
    depth: int = 2  # text transformer layers
    heads: int = 4  # text attention heads
    dim_head: int = 32  # width of one text attention head
    embed_dim: int = 64  # joint image-text embedding size
    image_size: int = 0  # pixels the image encoder reads; 0 = data.image_size
    image_channels: int = 32  # conv width after the stem, doubled at every downsampling
    image_downsamples: int = 3  # stride-2 convs: 32 px -> 4x4 feature map
    init_temperature: float = 0.07  # CLIP paper: learned temperature, initialised at 0.07


@dataclass
class TrainConfig:
    stage: str = "vae"  # vae | dalle | clip
    out_dir: str = "outputs/run"  # logs, checkpoints and the exported model folder
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    accelerator: str = "auto"  # cpu | gpu | auto
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed
    accumulate_grad_batches: int = 1
    log_every: int = 10
    ckpt_every: int = 200  # steps between Lightning checkpoints (for --resume)
    sample_every: int = 0  # steps between picture grids in out_dir/pictures; 0 = off
    val_every: int = 100  # steps between held-out validation passes (logged, printed); 0 = off
    val_batches: int = 16  # batches of held-out data per validation pass
    threads: int = 0  # torch.set_num_threads; 0 = leave torch's default
    progress_bar: bool = True
    nan_policy: str = "stop"  # NaN/Inf loss: stop (error naming the step) | skip (drop the batch)


@dataclass
class SampleConfig:
    """The recommended sampling settings a training run writes into the model folder.

    At the end of the ``dalle`` stage (and again after ``clip``, which adds a scorer)
    every combination of ``sweep`` (sampling option -> values, on top of ``options``)
    and of ``candidates`` is sampled for ``prompts`` held-out captions, ``images``
    each, and judged; the simplest setting within one standard error of the best is
    written to ``model/sampling.json`` (see dalle1/recommend.py). ``sweep: {}``
    writes ``options`` as they are, without sampling.
    """

    options: dict[str, Any] = field(default_factory=dict)  # fixed options, e.g. {top_k: 32}
    # option -> values tried, simplest first (any field of dalle1.sampling.SamplingOptions)
    sweep: dict[str, Any] = field(default_factory=lambda: {"cond_scale": [1.0, 1.5, 2.0, 3.0, 4.0]})
    candidates: list[int] = field(
        default_factory=lambda: [1, 4]
    )  # per image; best kept by the scorer
    prompts: int = 16  # distinct held-out captions sampled in the sweep
    images: int = 8  # images per caption and setting
    seed: int = 0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    dalle: DALLEConfig = field(default_factory=DALLEConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


SECTIONS = {f.name: f.type for f in fields(Config)}


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` coerced to ``annotation`` or raise ConfigError naming ``key``."""
    hint = annotation
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # e.g. text.text_len: int | str ("auto")
        for option in typing.get_args(hint):
            try:
                return _check_type(key, value, option)
            except ConfigError:
                pass
        names = " or ".join(getattr(o, "__name__", str(o)) for o in typing.get_args(hint))
        raise ConfigError(f"{key}: expected {names}, got {type(value).__name__} ({value!r})")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} ({value!r})")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} ({value!r})")
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {hint.__name__}, got bool ({value!r})")
    if not isinstance(value, hint):
        raise ConfigError(
            f"{key}: expected {hint.__name__}, got {type(value).__name__} ({value!r})"
        )
    return value


def build_section(cls: type, values: dict, prefix: str) -> Any:
    """One config dataclass from a mapping; unknown keys and wrong types name ``prefix + key``."""
    if not isinstance(values, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(values).__name__}"
        )
    allowed = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in allowed:
            raise ConfigError(f"unknown key '{name}'; allowed keys: {', '.join(allowed)}")
        ftype = hints[key]
        if dataclasses.is_dataclass(ftype):
            kwargs[key] = build_section(ftype, value or {}, f"{name}.")
        else:
            kwargs[key] = _check_type(name, value, ftype)
    return cls(**kwargs)


def config_from_dict(values: dict) -> Config:
    """Build a validated :class:`Config` from nested dictionaries (YAML / JSON)."""
    cfg = build_section(Config, values or {}, "")
    validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.max_steps=10"`` -> (["train", "max_steps"], 10); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML ({err})") from None
    return key.split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults), apply ``section.key=value`` overrides, validate."""
    values: dict = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        except OSError as err:
            raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for text in overrides or []:
        keys, value = parse_override(text)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{k}' is not a section")
        node[keys[-1]] = value
    return config_from_dict(values)


def validate(cfg: Config) -> None:
    """Cross-field checks that a type check alone cannot express."""
    choices = {
        "train.stage": (cfg.train.stage, ("vae", "dalle", "clip")),
        "vae.quantizer": (cfg.vae.quantizer, ("vq", "fsq", "gumbel")),
        "vae.recon_loss": (cfg.vae.recon_loss, ("mse", "l1", "logit_laplace")),
        "dalle.attention": (cfg.dalle.attention, ("dense", "dalle")),
        "data.format": (cfg.data.format, ("auto", "folder", "manifest", "webdataset")),
        "train.nan_policy": (cfg.train.nan_policy, ("stop", "skip")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(allowed)}")
    v = cfg.vae
    if v.image_size % (2**v.num_downsamples) != 0:
        raise ConfigError(
            f"vae.image_size={v.image_size} is not divisible by 2**vae.num_downsamples={2**v.num_downsamples}"
        )
    if not 0.0 <= cfg.dalle.text_loss_weight <= 1.0:
        raise ConfigError(f"dalle.text_loss_weight={cfg.dalle.text_loss_weight} must lie in [0, 1]")
    if not 0.0 <= cfg.dalle.p_uncond < 1.0:
        raise ConfigError(f"dalle.p_uncond={cfg.dalle.p_uncond} must lie in [0, 1)")
    if cfg.dalle.conv_kernel % 2 != 1:
        raise ConfigError(f"dalle.conv_kernel={cfg.dalle.conv_kernel} must be odd")
    if isinstance(cfg.text.text_len, str) and cfg.text.text_len != "auto":
        raise ConfigError(f"text.text_len: '{cfg.text.text_len}' is neither a number nor 'auto'")
    for key in (
        "text.vocab_size",
        *(["text.text_len"] if isinstance(cfg.text.text_len, int) else []),
        "vae.codebook_size",
        "dalle.depth",
        "dalle.heads",
    ):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            raise ConfigError(f"{key} must be >= 1")
    if cfg.vae.quantizer == "fsq":  # the FSQ levels must multiply to the codebook size
        try:
            resolve_fsq_levels(cfg.vae)
        except ValueError as err:
            raise ConfigError(str(err)) from None


# --- FSQ levels (vae.quantizer: fsq): arithmetic on the config, checked when it loads --------

#: levels allowed per FSQ dimension when they are chosen automatically
FSQ_LEVEL_CHOICES = (8, 7, 6, 5, 4, 3)


def fsq_levels_for(codebook_size: int) -> list[int]:
    """FSQ levels whose product is exactly ``codebook_size``.

    Factors are taken from 3..8 (FSQ needs > 2 levels per dimension to be
    useful); among the factorisations the one with the fewest dimensions wins,
    then the most balanced one. ``256 -> [8, 8, 4]``, ``512 -> [8, 8, 8]``,
    ``1000 -> [8, 5, 5, 5]``, ``8192 -> [8, 8, 8, 4, 4]``. Sizes with a prime
    factor above 8 (e.g. 11, 257) have no such factorisation: a ValueError
    names ``codebook_size`` and asks for explicit ``vae.fsq_levels``.
    """
    best: list[int] | None = None

    def search(rest: int, largest: int, chosen: list[int]) -> None:
        nonlocal best
        if rest == 1:
            key = (len(chosen), max(chosen) - min(chosen))
            if best is None or key < (len(best), max(best) - min(best)):
                best = list(chosen)
            return
        if best is not None and len(chosen) >= len(best):
            return
        for level in FSQ_LEVEL_CHOICES:
            if level <= largest and rest % level == 0:
                search(rest // level, level, [*chosen, level])

    if codebook_size > 1:
        search(codebook_size, max(FSQ_LEVEL_CHOICES), [])
    if best is None:
        raise ValueError(
            f"vae.codebook_size={codebook_size} is not a product of FSQ levels between 3 and 8; "
            "pick another codebook_size (e.g. 256, 512, 1000, 1024) or set vae.fsq_levels explicitly"
        )
    return best


def resolve_fsq_levels(cfg: VAEConfig) -> list[int]:
    """``cfg.fsq_levels`` (checked against ``codebook_size``) or the automatic choice."""
    if not cfg.fsq_levels:
        return fsq_levels_for(cfg.codebook_size)
    if any(level < 2 for level in cfg.fsq_levels):
        raise ValueError(f"vae.fsq_levels={cfg.fsq_levels}: every level must be >= 2")
    product = math.prod(cfg.fsq_levels)
    if product != cfg.codebook_size:
        raise ValueError(
            f"vae.fsq_levels={cfg.fsq_levels} imply {product} codes but vae.codebook_size={cfg.codebook_size}; "
            "make them agree (or leave fsq_levels empty to choose levels automatically)"
        )
    return list(cfg.fsq_levels)
