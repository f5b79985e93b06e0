"""Sampling image codes one by one in raster order (paper section 2.6, "Sample Generation").

Read top to bottom, :func:`sample_codes` does this (the options are a
:class:`SamplingOptions`, the one object the entry points pass around):

1. the caption is read once (:meth:`DALLE.prefill`), filling a key/value cache;
2. at every step the next code's logits are turned into one code per row:
   temperature, then top-k, then top-p (nucleus), then a draw from each row's own
   ``torch.Generator`` (:func:`next_code`, :func:`draw`: :func:`filter_logits` then
   :func:`pick`, with top-k alone a draw among the k kept codes only). The
   logits are the *image* head's only, so the filters never see text tokens;
3. the code is fed back (:meth:`DALLE.step`): one position through every layer,
   reusing the cache. ``use_cache=False`` recomputes the whole stream instead, which
   gives the same codes (tests) and is the benchmark's baseline.

Classifier-free guidance runs the conditional rows and unconditional rows (the empty
caption: all per-position pads) as one batch of 2B rows, each row with its own slice
of the cache, and mixes ``uncond + s · (cond − uncond)`` in float32. Nothing the
caller passed in is modified: the doubled batch is a new tensor.

Editing is built in: ``keep`` marks codes that must stay equal to ``init_codes``;
the sampler forces them as it passes them, so later codes condition on them exactly
as if they had been sampled.

Precision: the transformer runs in its weights' own dtype. For bfloat16 decoding,
cast the model once (``model.to(torch.bfloat16)``, or ``DALLEPipeline.from_pretrained(...,
dtype=torch.bfloat16)``); nothing is autocast inside the loop (autocast under
``inference_mode`` re-casts every weight at every step). Logits are cast to float32
before guidance, filtering and sampling.

Speed: the step is :meth:`DALLE.step` (:mod:`dalle1.decoding`); ``decode=`` picks its
form (eager, compiled, CUDA graph; default ``$DALLE1_DECODE`` or ``auto``). On a CPU a
cached loop over fewer than 4 rows runs on one thread where OpenMP's idle threads spin
(dalle1's default), over fewer than 32 where they sleep at once
(:func:`dalle1.decoding.decode_threads`), except for reads of several MB of keys and
values (2 MB where a step's reads exceed the CPU's last-level cache, else 6 MB;
:func:`dalle1.decoding.read_threads`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .decoding import decode_threads, intra_op_threads
from .transformer import DALLE

Generators = torch.Generator | Sequence[torch.Generator] | None


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Keep the ``top_k`` largest logits, then the smallest set with probability ≥ ``top_p``.

    Everything else becomes ``-inf``. Ties with the k-th logit are kept. The nucleus
    keeps every token up to and including the one whose cumulative probability first
    reaches ``top_p`` (Holtzman et al. 2019), so at least one token always survives.
    """
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability mass of the tokens ranked higher
        drop_sorted = before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick(logits: torch.Tensor, temperature: float, generators: Generators) -> torch.Tensor:
    """Draw one code per row from (already filtered) logits; temperature 0 is greedy.

    ``generators``: one ``torch.Generator`` for the whole batch, or a list with one per
    row, so that a row's draws do not depend on which other rows share its batch.
    """
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    probs = (logits if temperature == 1 else logits / temperature).softmax(-1)
    if isinstance(generators, torch.Generator) or generators is None:
        return torch.multinomial(probs, 1, generator=generators).squeeze(-1)
    # torch.multinomial's own draw for one sample, argmax(p / q) with q ~ Exp(1), with each
    # row's q from that row's generator: the codes of a per-row multinomial, in 2 batched ops
    q = torch.empty_like(probs)
    for row, g in zip(q, generators):
        row.exponential_(generator=g)
    return (probs / q).argmax(-1)


def draw(
    logits: torch.Tensor, top_k: int | None, top_p: float | None, generators: Generators
) -> torch.Tensor:
    """One code per row from the logits under the filters: ``pick(filter_logits(…))``.

    With top-k alone the draw runs among the k kept codes only, the same distribution for
    less work: a draw costs per code (a row's exponentials over 1,024 codes take 19 µs,
    over 64 2), so batch 8 spends 100 instead of 270 µs a step here. Not when a code ties
    with a row's k-th logit, which :func:`filter_logits` keeps too.
    """
    k = top_k
    if top_p is None and k is not None and 0 < k < logits.shape[-1]:
        top, codes = logits.topk(k + 1, dim=-1)  # sorted: a tie shows as top[k] == top[k-1]
        if not bool((top[..., k] == top[..., k - 1]).any()):
            return codes[..., :k].gather(-1, pick(top[..., :k], 1.0, generators)[..., None])[..., 0]
    return pick(filter_logits(logits, top_k, top_p), 1.0, generators)


@dataclass(frozen=True)
class SamplingOptions:
    """How every code is drawn from its logits; one object passed between the entry points.

    temperature: divides the logits before the filters; 0 = greedy.
    top_k, top_p: filters over the image vocabulary (see :func:`filter_logits`); None = off.
    cond_scale: classifier-free guidance scale; 1 = plain conditional sampling.
    guidance_top_p: with guidance, draw only among the codes in the *conditional*
        distribution's top-p nucleus (None = all codes). Plain guidance
        ``uncond + s · (cond − uncond)`` boosts any code the unconditional model finds
        unlikely, however unlikely the caption makes it too; on small models that
        breaks shapes apart at s ≥ 2. Restricting the guided draw to what the
        conditional model itself considers plausible keeps guidance's sharpening
        without those codes (docs/quality.md measures it).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cond_scale: float = 1.0
    guidance_top_p: float | None = None

    @property
    def guided(self) -> bool:
        return self.cond_scale != 1.0

    def check(self) -> None:
        """One-line errors for values no sampler can use."""
        for name in ("temperature", "cond_scale", "top_p"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.guidance_top_p is not None and not 0 < self.guidance_top_p <= 1:
            raise ValueError(f"guidance_top_p must lie in (0, 1], got {self.guidance_top_p}")


def next_code(
    logits: torch.Tensor, options: SamplingOptions, generators: Generators
) -> torch.Tensor:
    """The next code of every row from its logits: guidance, temperature, filters, draw.

    With guidance the logits hold the conditional rows, then the unconditional ones, and
    are mixed ``uncond + s · (cond − uncond)``, then (``guidance_top_p``) limited to the
    conditional distribution's nucleus. Everything runs in float32, whatever the
    transformer's dtype.
    """
    logits = logits.float()
    if options.guided:
        cond, uncond = logits.chunk(2)
        logits = uncond + options.cond_scale * (cond - uncond)
    # one NaN or ±Inf makes the sum NaN or ±Inf (finite logits overflow it only past
    # 1e34 each, as broken): a reduction instead of a pass that writes a mask
    if not bool(logits.sum().isfinite()):
        raise ValueError(
            "the model's logits are not finite (NaN/Inf): the weights are broken or "
            f"cond_scale={options.cond_scale} is too large"
        )
    if options.guided and options.guidance_top_p is not None:
        outside = filter_logits(cond, top_p=options.guidance_top_p).isneginf()
        logits = logits.masked_fill(outside, float("-inf"))
    if options.temperature == 0:
        return logits.argmax(-1)
    if options.temperature < 1:  # l / T overflows for a tiny T: shift the largest logit to 0 first
        logits = logits - logits.amax(-1, keepdim=True)
    if options.temperature != 1:  # l / 1 is l: no pass over the logits for the default
        logits = logits / options.temperature
    return draw(logits, options.top_k, options.top_p, generators)


def _check(
    text: torch.Tensor,
    model: DALLE,
    options: SamplingOptions,
    generators: Generators,
    keep: torch.Tensor | None,
    init: torch.Tensor | None,
) -> None:
    """One-line errors for the caller's mistakes."""
    if text.ndim != 2 or text.shape[1] != model.shape.text_len:
        raise ValueError(
            f"text must be (batch, {model.shape.text_len}) token ids, got {tuple(text.shape)}"
        )
    options.check()
    gens = generators
    if gens is not None and not isinstance(gens, torch.Generator) and len(gens) != len(text):
        raise ValueError(f"got {len(gens)} generators for {len(text)} rows")
    if keep is not None:
        shape = (len(text), model.shape.num_codes)
        if init is None:
            raise ValueError("keep needs init_codes (the codes to keep)")
        if tuple(keep.shape) != shape or tuple(init.shape) != shape:
            raise ValueError(
                f"keep and init_codes must be {shape}, "
                f"got {tuple(keep.shape)} and {tuple(init.shape)}"
            )


def sample_codes(
    model: DALLE,
    text: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cond_scale: float = 1.0,
    guidance_top_p: float | None = None,
    null_text: torch.Tensor | None = None,
    generators: Generators = None,
    init_codes: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    use_cache: bool = True,
    progress: bool = False,
    decode: str | None = None,
    cache_dtype: str | torch.dtype | None = None,
) -> torch.Tensor:
    """Sample codes (B, N) for captions ``text`` (B, L); rows may hold different captions.

    temperature, top_k, top_p, cond_scale, guidance_top_p: see :class:`SamplingOptions`.
    null_text:  the empty caption (L,) used for the unconditional rows.
    generators: one generator, or one per row (a row then samples the same codes
                whatever else is in the batch).
    keep:       bool (B, N); where True the code is forced to ``init_codes``.
    use_cache:  False recomputes the whole stream at every step (tests / benchmarks).
    decode:     the cached step's form, ``eager | compile | graph | auto``
                (:func:`dalle1.decoding.decode_mode`; None = ``$DALLE1_DECODE`` or auto).
    cache_dtype: the key/value cache's dtype, e.g. ``bfloat16`` to halve what a step reads
                (:func:`dalle1.decoding.cache_dtype`; None = the model's ``cache_dtype``,
                else ``$DALLE1_CACHE_DTYPE``, else the weights' own, which keeps cached
                sampling equal to full recompute).
    """
    options = SamplingOptions(temperature, top_k, top_p, cond_scale, guidance_top_p)
    _check(text, model, options, generators, keep, init_codes)
    guided = options.guided
    if guided and null_text is None:
        raise ValueError("classifier-free guidance needs null_text (the all-pads caption)")
    device = text.device
    B, N = text.shape[0], model.shape.num_codes

    def doubled(x: torch.Tensor) -> torch.Tensor:  # the same codes feed both halves of the batch
        return torch.cat([x, x]) if guided else x

    # 2B rows under guidance: the conditional rows, then the empty caption's
    n_rows = 2 * B if guided else B
    threads = decode_threads(n_rows, device) if use_cache else torch.get_num_threads()
    with torch.inference_mode(), intra_op_threads(threads):
        rows = torch.cat([text, null_text.to(text).expand_as(text)]) if guided else text
        codes = torch.zeros(B, N, dtype=torch.long, device=device)
        if use_cache:
            logits, cache = model.prefill(rows, decode=decode, cache_dtype=cache_dtype)
        for t in tqdm(range(N), desc="sampling", disable=not progress, leave=False):
            if not use_cache:
                logits = model.next_logits_uncached(rows, doubled(codes[:, :t]))
            code = next_code(logits, options, generators)
            if keep is not None:
                code = torch.where(keep[:, t], init_codes[:, t], code)
            codes[:, t] = code
            if use_cache and t < N - 1:
                logits, cache = model.step(doubled(code), t, cache)
    return codes.clone()  # a normal tensor again (inference-mode tensors refuse in-place edits)
