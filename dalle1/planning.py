"""Planning a run from its config: parameters, FLOPs, memory per GPU, step time, decode speed.

Every figure comes from the config and from the model it builds, on the meta device (no
memory, no weights): the parameter count is the built model's, the FLOPs are counted from
its own Linear layers, and the decoding estimate reads the keys each layer's own mask
allows. So the plan follows the code; tests/test_planning.py holds the FLOP count to
torch's FlopCounterMode and the activation bytes to the tensors autograd really saves.

Conventions (written out because every MFU figure depends on them):

* **FLOPs** are model FLOPs (PaLM, Chowdhery et al. 2022, appendix B): 2 per multiply-add
  of every matmul, backward = 2 x forward, attention counted over all ``S`` stream
  positions per query (what a dense kernel computes), norms, softmax and embedding
  look-ups not counted, activation recomputation not counted (that would be hardware
  FLOPs). ``attention_needed`` counts only the (query, key) pairs the masks allow.
* **Stream length** ``S = L + N``: the model reads ``[<bos>, t_1 … t_L, c_1 … c_{N-1}]``.
* **Training memory** per GPU = the sharded (FSDP) or replicated (DDP) weights, gradients
  and AdamW moments, 16 bytes per parameter (float32 master weights and gradients, two
  float32 moments) + the FSDP working set (two layers gathered in the compute dtype —
  the one running and the one prefetched —, one layer's unsharded float32 gradients, the
  root unit's embeddings and heads gathered) + the activations of one micro-batch. Not
  counted: the CUDA context and allocator slack (typically 1–3 GB).
* **Activations** per layer and sample: what autograd keeps for backward in
  :class:`dalle1.transformer.DALLE`'s layer — per stream position
  ``4·dim + 4·heads·dim_head + 2·ff`` values in the compute dtype (each of the two
  norms, one fused layer norm, keeps its input, and the products that read its output
  keep that; q, k, v and the
  attention output; the feed-forward's GELU input and output), 16 bytes of LayerNorm
  statistics and 4 bytes of log-sum-exp per head, for dense and sparse layers alike (a
  row / column / conv layer keeps no mask of its own: :mod:`dalle1.attention` gathers
  its blocks again in the backward pass). With per-layer activation checkpointing a
  layer keeps only its input,
  and one layer's full activations live again during its backward.
* **Decoding** is bounded by memory bandwidth: each step reads the weights it uses
  (the layers, the final norm, the image head) once and the cached keys and values
  once; tokens/s = batch / (bytes per step / HBM bandwidth).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from .config import Config, DALLEConfig
from .masks import stream_mask
from .transformer import DALLE, StreamShape

GB = 1e9


@dataclass(frozen=True)
class GPU:
    """A GPU's datasheet figures (dense, no sparsity): FLOP/s, bytes/s, bytes."""

    name: str
    bf16_flops: float  # tensor-core peak for bf16 / fp16 matmuls
    fp32_flops: float  # plain float32 (no TF32)
    hbm_bandwidth: float
    memory: float


GPUS = {
    "a100": GPU("NVIDIA A100 SXM 80GB", 312e12, 19.5e12, 2.039e12, 80 * GB),
    "h100": GPU("NVIDIA H100 SXM 80GB", 989e12, 67e12, 3.35e12, 80 * GB),
    "h200": GPU("NVIDIA H200 SXM 141GB", 989e12, 67e12, 4.8e12, 141 * GB),
}


def low_precision(precision: str) -> bool:
    """Does Lightning's ``precision`` compute the matmuls in 16 bits?"""
    return precision.startswith(("bf16", "16"))


# --- the model a config builds ----------------------------------------------------------


def stream_shape(config: Config) -> StreamShape:
    """The stream shape a config implies before any tokenizer is trained.

    Text vocabulary = ``text.vocab_size`` BPE tokens + one pad per position (as
    :class:`dalle1.text.TextTokenizer` lays it out), image vocabulary = the codebook,
    grid = ``vae.image_size / 2**vae.num_downsamples``; ``<bos>`` is id 1 (BPE specials
    ``<unk>``, ``<bos>``), which no count depends on.
    """
    grid = config.vae.image_size // 2**config.vae.num_downsamples
    text = config.text
    return StreamShape(
        text.vocab_size + text.text_len, text.text_len, config.vae.codebook_size, grid, 1
    )


def meta_model(cfg: DALLEConfig, shape: StreamShape) -> DALLE:
    """The transformer on the meta device: every shape, no memory (the masks live on the CPU)."""
    with torch.device("meta"):
        return DALLE(cfg, shape)


def parameter_counts(model: DALLE) -> dict[str, int]:
    """Parameters by part: embeddings (tokens, positions), layers, output (final norm, heads)."""
    counts = {"embeddings": 0, "layers": 0, "output": 0}
    for name, p in model.named_parameters():
        part = "layers" if name.startswith("layers.") else "output"
        if name.split(".")[0].endswith(("_emb", "_pos")):
            part = "embeddings"
        counts[part] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def _linear_macs(module: nn.Module) -> int:
    """Multiply-adds per token of every Linear inside ``module``."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def attention_width(cfg: DALLEConfig) -> int:
    return cfg.heads * cfg.dim_head


def key_counts(model: DALLE, kind: str) -> list[int]:
    """For each query position of the stream: how many keys a layer of ``kind`` attends."""
    s = model.shape
    S = s.text_len + s.num_codes
    if kind == "dense":
        return list(range(1, S + 1))
    return stream_mask(kind, s.text_len, s.grid, model.cfg.conv_kernel).sum(1).tolist()


def keys_needed(model: DALLE) -> list[float]:
    """Per layer: the keys the mask allows, summed over all ``S`` query positions."""
    counts = {kind: float(sum(key_counts(model, kind))) for kind in set(model.kinds)}
    return [counts[kind] for kind in model.kinds]


def forward_flops(model: DALLE, attention: str = "computed") -> float:
    """Forward FLOPs of one sequence (one caption + one image): 2 x multiply-adds.

    Layers: every Linear of every layer at all ``S`` positions; heads: the text head at
    the ``L`` text positions, the image head at the ``N`` image positions; attention:
    q·k and p·v, ``2 x heads x dim_head`` multiply-adds per (query, key) pair, over all
    ``S²`` pairs per layer (``computed``, the MFU convention) or only the pairs the masks
    allow (``needed``).
    """
    s = model.shape
    S = s.text_len + s.num_codes
    macs = S * sum(_linear_macs(layer) for layer in model.layers)
    macs += s.text_len * _linear_macs(model.to_text_logits)
    macs += s.num_codes * _linear_macs(model.to_image_logits)
    pairs = model.cfg.depth * S * S if attention == "computed" else sum(keys_needed(model))
    macs += 2 * attention_width(model.cfg) * pairs
    return 2.0 * macs


def train_flops_per_token(model: DALLE, attention: str = "computed") -> float:
    """Model FLOPs of one training token: forward + backward (2 x forward), per position."""
    S = model.shape.text_len + model.shape.num_codes
    return 3.0 * forward_flops(model, attention) / S


# --- memory ---------------------------------------------------------------------------------


def activation_bytes_per_layer(model: DALLE, kind: str, precision: str) -> float:
    """Bytes one layer keeps for backward, per sample (module docstring: *Activations*)."""
    cfg, s = model.cfg, model.shape
    S = s.text_len + s.num_codes
    b = 2 if low_precision(precision) else 4
    ff = max(m.out_features for m in model.layers[0].modules() if isinstance(m, nn.Linear))
    per_position = (4 * cfg.dim + 4 * attention_width(cfg) + 2 * ff) * b + 16 + 4 * cfg.heads
    return S * per_position


def logits_bytes(model: DALLE, precision: str) -> float:
    """Peak bytes of the two heads' logits per sample: the logits in the compute dtype and
    their gradient, the same size (:func:`dalle1.transformer.cross_entropy` converts them
    to float32 a cache-sized piece at a time and keeps no float32 copy)."""
    s = model.shape
    b = 2 if low_precision(precision) else 4
    return (s.text_len * s.text_vocab + s.num_codes * s.image_vocab) * 2 * b


def activation_bytes(model: DALLE, precision: str, checkpointing: bool) -> float:
    """Activation bytes of one sample through the whole model, at the peak of backward."""
    per_layer = [activation_bytes_per_layer(model, k, precision) for k in model.kinds]
    S = model.shape.text_len + model.shape.num_codes
    b = 2 if low_precision(precision) else 4
    if checkpointing:  # every layer keeps its input; one layer is recomputed at a time
        held = model.cfg.depth * S * model.cfg.dim * b + max(per_layer)
    else:
        held = sum(per_layer)
    return held + logits_bytes(model, precision)


def training_memory(
    model: DALLE,
    counts: dict[str, int],
    gpus: int,
    strategy: str,
    precision: str,
    micro_batch: int,
    checkpointing: bool,
) -> dict[str, float]:
    """Bytes per GPU for training (module docstring: *Training memory*)."""
    total = counts["total"]
    sharded = strategy == "fsdp"
    state = 16.0 * total / (gpus if sharded else 1)
    working = 0.0
    if sharded:
        b = 2 if low_precision(precision) else 4
        layer = counts["layers"] / model.cfg.depth
        working = 2 * layer * b + layer * 4 + (counts["embeddings"] + counts["output"]) * b
    acts = micro_batch * activation_bytes(model, precision, checkpointing)
    return {
        "state": state,
        "working": working,
        "activations": acts,
        "total": state + working + acts,
    }


# --- decoding ------------------------------------------------------------------------------


def decode_bytes_per_step(
    model: DALLE, batch: int, sparse_keys: bool, weight_bytes: int = 2
) -> float:
    """Bytes one cached decoding step reads, averaged over the ``N - 1`` steps of an image.

    The weights it uses once (layers, final norm, image head; ``weight_bytes`` each: 2 for
    bf16 weights) and, per layer, the cached keys and values of the positions it attends:
    all earlier positions, or (``sparse_keys``) only those its mask allows.
    """
    s = model.shape
    used = sum(p.numel() for p in model.layers.parameters())
    used += sum(p.numel() for p in model.norm.parameters())
    used += sum(p.numel() for p in model.to_image_logits.parameters())
    positions = range(s.text_len + 1, s.text_len + s.num_codes)  # the queries of the steps
    counts = {
        kind: key_counts(model, kind if sparse_keys else "dense") for kind in set(model.kinds)
    }
    keys = sum(sum(counts[kind][p] for p in positions) / len(positions) for kind in model.kinds)
    kv = batch * 2 * attention_width(model.cfg) * keys * weight_bytes
    return used * weight_bytes + kv


def decode_tokens_per_second(model: DALLE, gpu: GPU, batch: int, sparse_keys: bool) -> float:
    """Image tokens per second at the HBM bound, bf16 weights and cache."""
    return batch / (decode_bytes_per_step(model, batch, sparse_keys) / gpu.hbm_bandwidth)


# --- the plan -------------------------------------------------------------------------------


@dataclass
class PlanOptions:
    gpus: int
    gpu: str = "h100"
    strategy: str = "fsdp"  # fsdp | ddp
    precision: str = "bf16-mixed"
    micro_batch: int = 1  # samples per GPU per forward pass
    global_batch: int = 0  # samples per optimizer step; 0: the config's
    checkpointing: bool = True
    mfu: float = 0.4  # assumed model FLOPs utilisation for the step time
    decode_batch: int = 64


def plan(config: Config, opts: PlanOptions) -> dict:
    """Every figure of a run's plan, as plain numbers (bytes, FLOPs, seconds)."""
    if opts.gpu not in GPUS:
        raise ValueError(f"--gpu {opts.gpu}: expected one of {', '.join(GPUS)}")
    if opts.gpus < 1 or opts.micro_batch < 1:
        raise ValueError("--gpus and --micro-batch must be >= 1")
    gpu = GPUS[opts.gpu]
    t = config.train
    start = time.perf_counter()
    model = meta_model(config.dalle, stream_shape(config))
    build_s = time.perf_counter() - start
    counts = parameter_counts(model)
    s = model.shape
    S = s.text_len + s.num_codes
    world = _config_world(config)
    global_batch = opts.global_batch or config.data.batch_size * world * t.accumulate_grad_batches
    accumulation = max(1, math.ceil(global_batch / (opts.gpus * opts.micro_batch)))
    per_token = train_flops_per_token(model)
    per_step = per_token * global_batch * S
    peak = gpu.bf16_flops if low_precision(opts.precision) else gpu.fp32_flops
    kinds = sorted(set(model.kinds))
    memory = {
        ckpt: training_memory(
            model, counts, opts.gpus, opts.strategy, opts.precision, opts.micro_batch, ckpt
        )
        for ckpt in (False, True)
    }
    return {
        "config": {
            "dim": config.dalle.dim,
            "depth": config.dalle.depth,
            "heads": config.dalle.heads,
            "dim_head": config.dalle.dim_head,
            "attention": config.dalle.attention,
            "stream": S,
        },
        "options": vars(opts),
        "gpu": vars(gpu),
        "meta_build_s": build_s,
        "parameters": counts,
        "bytes_per_parameter": {
            "weights_grads_adam": 16.0,
            "per_gpu": 16.0 / (opts.gpus if opts.strategy == "fsdp" else 1),
            "compute_copy": 2 if low_precision(opts.precision) else 4,
        },
        "activation_bytes_per_layer": {
            k: {
                "no_checkpointing": activation_bytes_per_layer(model, k, opts.precision),
                "checkpointing": S * config.dalle.dim * (2 if low_precision(opts.precision) else 4),
            }
            for k in kinds
        },
        "memory_per_gpu": {
            "no_checkpointing": memory[False],
            "checkpointing": memory[True],
            "gpu_memory": gpu.memory,
        },
        "flops": {
            "per_token": per_token,
            "per_token_attention_needed": train_flops_per_token(model, "needed"),
            "per_step": per_step,
            "global_batch": global_batch,
            "gradient_accumulation": accumulation,
            "hardware_per_token_with_checkpointing": per_token * 4 / 3,
        },
        "step_time_s": per_step / (opts.gpus * peak * opts.mfu),
        "decode": {
            "batch": opts.decode_batch,
            "bf16_weight_bytes": 2 * counts["total"],
            "tokens_per_s_all_keys": decode_tokens_per_second(model, gpu, opts.decode_batch, False),
            "tokens_per_s_mask_keys": decode_tokens_per_second(model, gpu, opts.decode_batch, True),
            "bytes_per_step_all_keys": decode_bytes_per_step(model, opts.decode_batch, False),
            "bytes_per_step_mask_keys": decode_bytes_per_step(model, opts.decode_batch, True),
        },
    }


def _config_world(config: Config) -> int:
    devices = config.train.devices
    per_node = devices if isinstance(devices, int) and devices > 0 else 1
    if isinstance(devices, list | tuple):
        per_node = len(devices)
    return per_node * config.train.num_nodes


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:,.2f} {prefix}{unit}"
    return f"{value:,.2f} {unit}"


def format_plans(plans: list[dict]) -> str:
    """The plans (one per GPU count) as a text table, one column per plan."""
    first = plans[0]
    o, p, f, d = first["options"], first["parameters"], first["flops"], first["decode"]
    c = first["config"]
    lines = [
        f"model: dim {c['dim']}, depth {c['depth']}, heads {c['heads']} x {c['dim_head']}, "
        f"attention {c['attention']}, stream {c['stream']} tokens "
        f"(built on the meta device in {first['meta_build_s']:.2f} s)",
        f"parameters: {p['total']:,} (embeddings {p['embeddings']:,}, layers {p['layers']:,}, "
        f"norm + heads {p['output']:,})",
        f"precision {o['precision']}, strategy {o['strategy']}, micro-batch {o['micro_batch']} "
        f"per GPU, global batch {f['global_batch']}, GPU {first['gpu']['name']}",
        "",
        "activations per layer and sample (no checkpointing -> checkpointing):",
    ]
    for kind, a in first["activation_bytes_per_layer"].items():
        lines.append(
            f"  {kind:<7} {a['no_checkpointing'] / GB:8.3f} GB -> {a['checkpointing'] / GB:.4f} GB"
        )
    lines += ["", f"{'':<44}" + "".join(f"{q['options']['gpus']:>12} GPUs" for q in plans)]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"{label:<44}" + "".join(f"{v:>17}" for v in values))

    row(
        "weights+grads+AdamW bytes/param per GPU",
        [f"{q['bytes_per_parameter']['per_gpu']:.3f}" for q in plans],
    )
    for key, label in (("no_checkpointing", "without"), ("checkpointing", "with")):
        m = [q["memory_per_gpu"][key] for q in plans]
        row(f"memory/GPU {label} checkpointing (GB)", [f"{x['total'] / GB:.1f}" for x in m])
        row("  of which weights, grads, AdamW", [f"{x['state'] / GB:.1f}" for x in m])
        row("  of which FSDP gathered layers", [f"{x['working'] / GB:.1f}" for x in m])
        row("  of which activations", [f"{x['activations'] / GB:.1f}" for x in m])
    row("gradient accumulation steps", [str(q["flops"]["gradient_accumulation"]) for q in plans])
    row(f"step time at {o['mfu']:.0%} MFU", [f"{q['step_time_s']:.2f} s" for q in plans])
    lines += [
        f"  (GPU memory: {first['gpu']['memory'] / GB:.0f} GB)",
        "",
        f"training FLOPs per token: {_si(f['per_token'], 'FLOP')} "
        f"(attention over the masks' pairs only: {_si(f['per_token_attention_needed'], 'FLOP')}; "
        f"with recomputation: {_si(f['hardware_per_token_with_checkpointing'], 'FLOP')})",
        f"training FLOPs per step: {_si(f['per_step'], 'FLOP')}",
        f"decoding, batch {d['batch']}, bf16 weights ({d['bf16_weight_bytes'] / GB:.1f} GB), "
        f"HBM bound on one {first['gpu']['name']}:",
        f"  reading every cached key:       {d['tokens_per_s_all_keys']:,.0f} image tokens/s "
        f"({d['bytes_per_step_all_keys'] / GB:.1f} GB per step)",
        f"  reading only the keys the masks allow: {d['tokens_per_s_mask_keys']:,.0f} image tokens/s "
        f"({d['bytes_per_step_mask_keys'] / GB:.1f} GB per step)",
    ]
    return "\n".join(lines)


# --- peak FLOP/s of the device training runs on (for MFU in the training log) ---------------


def device_peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for ``device`` under ``precision``.

    A known GPU (A100, H100, H200): its datasheet figure (:data:`GPUS`). Anything else,
    the CPU included: measured now, the best of five square matmuls of 1024 in the
    training precision's matmul dtype — what this device can do, not a datasheet.
    Under bf16 it is the faster of the bf16 and the float32 rate: a CPU without bf16
    instructions multiplies bf16 far slower than float32 (0.75 GFLOP/s on a Zen 1 core
    pair), and a step under autocast, which keeps some of its work in float32, would
    otherwise show an MFU above 1.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key, gpu in GPUS.items():
            if key in name:
                return (gpu.bf16_flops if low_precision(precision) else gpu.fp32_flops), gpu.name
    dtypes = [torch.bfloat16, torch.float32] if low_precision(precision) else [torch.float32]
    rates = {dtype: measure_matmul_flops(device, dtype) for dtype in dtypes}
    fastest = max(rates, key=rates.get)
    return rates[fastest], f"measured ({device.type}, {fastest})"


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024) -> float:
    a = torch.full((n, n), 0.5, device=device, dtype=dtype)  # no draw from the global RNG
    best = math.inf
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
