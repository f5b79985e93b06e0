"""Configuration as plain dataclasses, one per section of a YAML file.

A config file has the sections ``data``, ``text``, ``vae``, ``dalle``, ``clip``,
``train`` and ``sample``; ``train.stage`` says which model the file trains. Every number
the paper fixes has a named field here, with the paper's value in the comment
of ``configs/paper_*.yaml``.

Loading is strict, and the same for a YAML file and a model folder's JSON
(:class:`ConfigError`, one line naming the key):

- YAML is read by :class:`StrictLoader`: a key given twice and aliases
  (``*name``, the "billion laughs" bomb) are refused, ``3e-4`` is a float;
- an unknown key names itself and the allowed keys, a wrong type names the key
  and the expected type;
- numbers must lie in their range (:data:`RANGES`), choices in their set, and
  cross-field rules hold (:func:`validate`);
- the model a config describes is sized from the config alone, before anything
  is allocated (:func:`estimate_size`): over ``train.max_model_gb`` it is refused
  unless that key is raised on purpose.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .files import UnsafeFileError, read_text


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
    # "colour shape" pairs no built-in image shows (a compositional benchmark), e.g. ["red square"]
    synthetic_holdout: list[str] = field(default_factory=list)
    # recoloured copies of each training image whose caption names a colour, the caption
    # rewritten to match (colour words are learned from the data; docs/quality.md)
    colour_swaps: int = 0
    seed: int = 0


@dataclass
class TextConfig:
    vocab_size: int = 512  # BPE vocabulary, special tokens included (paper: 16384)
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
    hue_augment: float = 0.0  # share of training images whose hue is turned by a random angle


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
    strategy: str = "auto"  # auto | ddp | fsdp (the transformer sharded per layer, FSDP2)
    activation_checkpointing: bool = False  # recompute each transformer layer in backward
    # peak FLOP/s of one device for the MFU in the log; 0 = A100/H100/H200 datasheet, else measured
    peak_flops: float = 0.0
    # auto (bf16-mixed where it trains faster: dalle1/training/precision.py) | 32-true |
    # bf16-mixed | 16-mixed
    precision: str = "auto"
    accumulate_grad_batches: int = 1
    log_every: int = 10
    ckpt_every: int = 200  # steps between Lightning checkpoints (for --resume)
    sample_every: int = 0  # steps between picture grids in out_dir/pictures; 0 = off
    val_every: int = 100  # steps between held-out validation passes (logged, printed); 0 = off
    val_batches: int = 16  # batches of held-out data per validation pass
    threads: int = 0  # torch.set_num_threads; 0 = leave torch's default
    # let glibc keep freed memory for the next step (dalle1/training/allocator.py)
    keep_freed_memory: bool = True
    progress_bar: bool = True
    nan_policy: str = "stop"  # NaN/Inf loss: stop (error naming the step) | skip (drop the batch)
    max_model_gb: float = 16.0  # refuse configs whose model is estimated bigger (raise on purpose)


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
    # images sampled per image returned, tried with a scorer (the best is kept)
    candidates: list[int] = field(default_factory=lambda: [1, 4])
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
    if hint is int and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {hint.__name__}, got bool ({value!r})")
    if not isinstance(value, hint):
        raise ConfigError(
            f"{key}: expected {hint.__name__}, got {type(value).__name__} ({value!r})"
        )
    return value


def build_section(cls: type, values: dict, prefix: str, required: tuple[str, ...] = ()) -> Any:
    """One config dataclass from a mapping; unknown keys and wrong types name ``prefix + key``.

    ``required`` keys must be present (model folders: the keys that shape the weights); a
    field without a default is always required. Numbers are range-checked (:data:`RANGES`).
    """
    if not isinstance(values, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(values).__name__}"
        )
    allowed = {f.name: f for f in fields(cls)}
    needed = set(required) | {
        f.name
        for f in fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = [name for name in allowed if name in needed and name not in values]
    if missing:
        raise ConfigError(f"missing key '{prefix}{missing[0]}'")
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
            kwargs[key] = _check_range(name, _check_type(name, value, ftype))
    return cls(**kwargs)


def config_from_dict(values: dict) -> Config:
    """Build a validated :class:`Config` from nested dictionaries (YAML / JSON)."""
    cfg = build_section(Config, values or {}, "")
    validate(cfg)
    return cfg


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no ``!!python`` tags) that also refuses what a config never needs.

    - a key given twice in one mapping (YAML would silently keep the last one, so a second
      ``train:`` section would replace the first);
    - aliases ``*name``: a 1 kB file of nested aliases expands to billions of nodes;
    - and reads YAML 1.2 floats such as ``3e-4`` or ``1e9`` as numbers (YAML 1.1, PyYAML's
      default, needs a dot and reads ``3e-4`` as a string).
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(
                f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not "
                "allowed in a config; write the value out"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = key_node.value
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise ConfigError(
                        f"line {line}: key '{key}' is given twice (first on line {seen[key]})"
                    )
                seen[key] = line
        return super().construct_mapping(node, deep)


StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python values with :class:`StrictLoader`; one-line ConfigError naming ``where``."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except yaml.YAMLError as err:
        detail = " ".join(str(err).split())
        raise ConfigError(f"{where}: not valid YAML ({detail})") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.max_steps=10"`` -> (["train", "max_steps"], 10); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.lstrip("-")
    value = parse_yaml(raw, f"override '{text}'") if raw != "" else ""
    return key.split("."), value


def read_config_file(path: str | Path) -> dict:
    """A YAML config file -> its mapping (a regular file of at most 4 MiB, UTF-8, strict YAML)."""
    try:
        text = read_text(path, "config")
    except FileNotFoundError:
        raise ConfigError(f"{path}: cannot read (no such file)") from None
    except UnsafeFileError as err:
        reason = str(err).split(f"'{path}' ", 1)[-1]
        if "not UTF-8" in reason:
            raise ConfigError(f"{path}: not UTF-8 text ({reason.split('(', 1)[-1]}") from None
        raise ConfigError(f"{path}: cannot read ({reason})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    values = parse_yaml(text, str(path)) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults), apply ``section.key=value`` overrides, validate."""
    values: dict = read_config_file(path) if path is not None else {}
    for text in overrides or []:
        keys, value = parse_override(text)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{k}' is not a section")
        node[keys[-1]] = value
    return config_from_dict(values)


# --- ranges: every number a config holds, checked as it is read --------------------------


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: ``low <= x`` (``low < x`` if open) and the same for ``high``."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def holds(self, x: float) -> bool:
        if self.low is not None and (x <= self.low if self.open_low else x < self.low):
            return False
        return not (self.high is not None and (x >= self.high if self.open_high else x > self.high))

    def __str__(self) -> str:
        if self.high is None:
            return f"> {self.low}" if self.open_low else f">= {self.low}"
        left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
        return f"lie in {left}{self.low}, {self.high}{right}"


POSITIVE, NON_NEGATIVE = Range(1), Range(0)
FRACTION, PROPER_FRACTION = Range(0, 1), Range(0, 1, open_high=True)
ABOVE_ZERO = Range(0, open_low=True)
SEED = Range(0, 2**32 - 1)  # what torch, NumPy and Lightning accept

#: the range of every number a config can hold (keys as written in a config file)
RANGES: dict[str, Range] = {
    **{f"data.{k}": POSITIVE for k in ("image_size", "batch_size")},
    **{f"data.{k}": NON_NEGATIVE for k in ("num_workers", "shuffle_buffer", "synthetic_count")},
    "data.val_fraction": PROPER_FRACTION,
    "data.synthetic_max_shapes": Range(1, 2),
    "data.colour_swaps": Range(0, 16),
    "data.seed": SEED,
    **{f"text.{k}": POSITIVE for k in ("vocab_size", "text_len")},
    "text.bpe_dropout": PROPER_FRACTION,
    **{
        f"vae.{k}": POSITIVE
        for k in ("image_size", "channels", "hidden_dim", "codebook_dim", "fsq_levels")
    },
    "vae.codebook_size": Range(2),
    **{f"vae.{k}": NON_NEGATIVE for k in ("num_downsamples", "num_res_blocks")},
    "vae.vq_decay": FRACTION,
    **{
        f"vae.{k}": NON_NEGATIVE
        for k in (
            "vq_commitment_weight",
            "vq_dead_code_threshold",
            "gumbel_tau_steps",
            "gumbel_kl_weight",
            "gumbel_kl_steps",
        )
    },
    **{f"vae.{k}": ABOVE_ZERO for k in ("gumbel_tau_start", "gumbel_tau_end")},
    "vae.logit_laplace_eps": Range(0, 0.5, open_low=True, open_high=True),
    "vae.hue_augment": FRACTION,
    **{f"dalle.{k}": POSITIVE for k in ("dim", "depth", "heads", "dim_head", "ff_mult")},
    "dalle.conv_kernel": POSITIVE,
    "dalle.dropout": PROPER_FRACTION,
    "dalle.text_loss_weight": FRACTION,
    "dalle.p_uncond": PROPER_FRACTION,
    **{f"clip.{k}": POSITIVE for k in ("dim", "depth", "heads", "dim_head", "embed_dim")},
    **{f"clip.{k}": NON_NEGATIVE for k in ("image_size", "image_downsamples")},
    "clip.image_channels": POSITIVE,
    "clip.init_temperature": ABOVE_ZERO,
    **{
        f"train.{k}": POSITIVE
        for k in ("max_steps", "num_nodes", "accumulate_grad_batches", "log_every", "ckpt_every")
    },
    **{
        f"train.{k}": NON_NEGATIVE
        for k in (
            "warmup_steps",
            "weight_decay",
            "grad_clip",
            "sample_every",
            "val_every",
            "val_batches",
            "threads",
            "peak_flops",
        )
    },
    "train.lr": ABOVE_ZERO,
    "train.min_lr_ratio": FRACTION,
    "train.seed": SEED,
    "train.max_model_gb": ABOVE_ZERO,
    **{f"sample.{k}": POSITIVE for k in ("candidates", "prompts", "images")},
    "sample.seed": SEED,
    # the stream shape a model folder's dalle/config.json holds
    **{f"stream.{k}": POSITIVE for k in ("text_vocab", "text_len", "image_vocab", "grid")},
    "stream.bos_id": NON_NEGATIVE,
    # the text shape a clip/config.json holds
    **{f"clip.{k}": POSITIVE for k in ("text_vocab", "text_len", "bpe_vocab")},
}


def _check_range(key: str, value: Any) -> Any:
    """``value`` if it is a finite number in ``RANGES[key]`` (each item, for a list)."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_range(f"{key}[{i}]", item)
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value} must be a finite number")
    bounds = RANGES.get(key.split("[")[0])
    if bounds is not None and not bounds.holds(value):
        raise ConfigError(f"{key}={value} must {bounds}".replace("must >", "must be >"))
    return value


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")


def _choose(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(allowed)}")


def validate_vae(v: VAEConfig, prefix: str = "vae.") -> None:
    """The rules a VAE config obeys beyond types and ranges."""
    _choose(f"{prefix}quantizer", v.quantizer, ("vq", "fsq", "gumbel"))
    _choose(f"{prefix}recon_loss", v.recon_loss, ("mse", "l1", "logit_laplace"))
    if v.num_downsamples > 16 or v.image_size % (2**v.num_downsamples) != 0:
        raise ConfigError(
            f"vae.image_size={v.image_size} is not divisible by 2**vae.num_downsamples={2 ** min(v.num_downsamples, 99)}"
        )
    if v.quantizer == "fsq":  # the FSQ levels must multiply to the codebook size
        try:
            resolve_fsq_levels(v)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def validate_dalle(d: DALLEConfig, prefix: str = "dalle.") -> None:
    """The rules a transformer config obeys beyond types and ranges."""
    _choose(f"{prefix}attention", d.attention, ("dense", "dalle"))
    if d.conv_kernel % 2 != 1:
        raise ConfigError(f"dalle.conv_kernel={d.conv_kernel} must be odd")


def validate_devices(devices: Any) -> None:
    """``train.devices``: what Lightning accepts: an int (-1 = all), 'auto', '0,1' or [0, 1]."""
    ok = (
        (isinstance(devices, int) and not isinstance(devices, bool) and devices >= -1 and devices)
        or devices == "auto"
        or (isinstance(devices, str) and re.fullmatch(r"-1|\d+(,\d*)*", devices.strip()))
        or (
            isinstance(devices, list)
            and devices
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in devices)
        )
    )
    if not ok:
        raise ConfigError(
            "train.devices: expected a number of devices (>= 1, or -1 for all), 'auto', "
            f"a list of device ids like [0, 1] or a string like '0,1'; got {devices!r}"
        )


def validate(cfg: Config) -> None:
    """Ranges of every number, choices, cross-field rules and the size budget."""
    for section in fields(Config):
        values = getattr(cfg, section.name)
        for f in fields(values):
            _check_range(f"{section.name}.{f.name}", getattr(values, f.name))
    _choose("train.stage", cfg.train.stage, ("vae", "dalle", "clip"))
    _choose("data.format", cfg.data.format, ("auto", "folder", "manifest", "webdataset"))
    _choose("train.nan_policy", cfg.train.nan_policy, ("stop", "skip"))
    _choose("train.accelerator", cfg.train.accelerator, ACCELERATORS)
    validate_devices(cfg.train.devices)
    validate_vae(cfg.vae)
    validate_dalle(cfg.dalle)
    if isinstance(cfg.text.text_len, str) and cfg.text.text_len != "auto":
        raise ConfigError(f"text.text_len: '{cfg.text.text_len}' is neither a number nor 'auto'")
    check_budget(estimate_size(cfg), cfg.train.max_model_gb, f"train.stage={cfg.train.stage}")


# --- the size budget: parameters and bytes from the config alone, before any allocation -----

GB = 1e9


@dataclass(frozen=True)
class ModelSize:
    """What a model will hold: ``values`` (weights and buffers, counted) and ``bytes`` (float32
    weights, plus the attention-mask buffers of a transformer)."""

    values: int
    bytes: int

    def __add__(self, other: ModelSize) -> ModelSize:
        return ModelSize(self.values + other.values, self.bytes + other.bytes)


def _res_block(w: int) -> int:
    h = max(w // 4, 16)  # dalle1.vae.ResBlock
    return 9 * w * h + h + 9 * h * h + h + h * w + w


def vae_size(v: VAEConfig) -> ModelSize:
    """The weights of :class:`dalle1.vae.DiscreteVAE` for ``v`` (conv stacks + codebook)."""
    widths = [v.hidden_dim * 2**i for i in range(v.num_downsamples + 1)]
    code_in = v.codebook_size if v.quantizer == "gumbel" else v.codebook_dim
    out_channels = v.channels * (2 if v.recon_loss == "logit_laplace" else 1)
    n = 9 * v.channels * widths[0] + widths[0]  # encoder stem
    for w in widths[:-1]:  # encoder: res blocks, then a stride-2 conv doubling the width
        n += v.num_res_blocks * _res_block(w) + 16 * w * 2 * w + 2 * w
    n += v.num_res_blocks * _res_block(widths[-1]) + widths[-1] * code_in + code_in
    n += v.codebook_dim * widths[-1] + widths[-1]  # decoder input
    for w in reversed(widths[1:]):  # decoder: res blocks, upsample, conv halving the width
        n += v.num_res_blocks * _res_block(w) + 9 * w * (w // 2) + w // 2
    n += v.num_res_blocks * _res_block(widths[0]) + widths[0] * out_channels + out_channels
    n += v.codebook_size * v.codebook_dim  # codebook (a buffer for vq; none to speak of for fsq)
    return ModelSize(n, 4 * n)


def transformer_size(
    d: DALLEConfig, text_vocab: int, text_len: int, image_vocab: int, grid: int
) -> ModelSize:
    """The weights of :class:`dalle1.transformer.DALLE` and its mask buffers (S x S per kind)."""
    inner, hidden = d.heads * d.dim_head, d.ff_mult * d.dim
    per_layer = 4 * d.dim * inner + 2 * d.dim * hidden + hidden + 5 * d.dim
    embed = (text_vocab + image_vocab + text_len + 1 + 2 * grid) * d.dim
    heads = (d.dim + 1) * (text_vocab + image_vocab)
    n = d.depth * per_layer + embed + heads + 2 * d.dim
    stream = text_len + grid * grid
    kinds = 0 if d.attention == "dense" else min(d.depth, 3)
    # per sparse kind: a float bias, a bool mask and (at most) an int64 key index, S x S each;
    # building them needs a few more S x S temporaries
    masks = kinds * 13 * stream**2 + (16 * stream**2 if kinds else 0)
    return ModelSize(n, 4 * n + masks)


def clip_size(c: CLIPConfig, text_vocab: int, text_len: int, image_size: int) -> ModelSize:
    """The weights of :class:`dalle1.clip.CLIPScorer`: conv image encoder + text transformer."""
    ch = c.image_channels
    n = 27 * ch + ch
    for _ in range(c.image_downsamples):
        n += 32 * ch * ch + 2 * ch + 4 * ch + 36 * ch * ch + 2 * ch
        ch *= 2
    flat = ch * max(1, image_size // 2**c.image_downsamples) ** 2
    n += 2 * flat + (flat + 1) * c.dim + (c.dim + 1) * c.embed_dim
    inner = c.heads * c.dim_head
    n += (text_vocab + text_len + 2) * c.dim + c.depth * (4 * c.dim * inner + 8 * c.dim**2)
    n += (c.dim + 1) * c.embed_dim
    return ModelSize(n, 4 * n)


def estimate_size(cfg: Config) -> ModelSize:
    """The model ``train.stage`` builds, sized from the config (the transformer stage also
    holds its frozen VAE; its shape is taken from the ``vae`` section)."""
    v = cfg.vae
    vae = vae_size(v)
    grid = max(1, cfg.data.image_size // 2**v.num_downsamples)
    # text.text_len: auto is sized from the captions later; the paper's 256 bounds it here
    text_len = cfg.text.text_len if isinstance(cfg.text.text_len, int) else 256
    text_vocab = cfg.text.vocab_size + text_len
    if cfg.train.stage == "vae":
        return vae
    if cfg.train.stage == "dalle":
        return vae + transformer_size(cfg.dalle, text_vocab, text_len, v.codebook_size, grid)
    size = cfg.clip.image_size or cfg.data.image_size
    return clip_size(cfg.clip, text_vocab, text_len, size)


def check_budget(size: ModelSize, limit_gb: float, what: str) -> None:
    """ConfigError when ``size`` is over ``limit_gb`` (``train.max_model_gb``)."""
    if size.bytes > limit_gb * GB:
        raise ConfigError(
            f"{what}: the model would hold ~{size.values / 1e6:,.0f} million weights, "
            f"~{size.bytes / GB:,.1f} GB before training starts, over train.max_model_gb="
            f"{limit_gb:g}; check the sizes (dim, depth, hidden_dim, codebook_size, text_len, "
            "image_size) or raise train.max_model_gb on purpose"
        )


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
