"""Sampling image codes one by one in raster order (paper section 2.6, "Sample Generation").

Read top to bottom, :func:`sample_codes` does this:

1. the caption is read once (:meth:`DALLE.prefill`), filling a key/value cache;
2. at every step the next code's logits are turned into one code per row:
   temperature, then top-k, then top-p (nucleus), then a draw from each row's own
   ``torch.Generator`` (:func:`filter_logits`, :func:`pick`). The logits are the
   *image* head's only, so the filters never see text tokens;
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

Precision: ``autocast=True`` runs the transformer under bfloat16 autocast (the
default on a CUDA device that supports bf16; off on CPU, where float32 is the
exact reference). Logits are cast to float32 before guidance, filtering and
sampling either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

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
    probs = (logits.float() / temperature).softmax(-1)
    if isinstance(generators, torch.Generator) or generators is None:
        return torch.multinomial(probs, 1, generator=generators).squeeze(-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


def _check(text: torch.Tensor, model: DALLE, **kw) -> None:
    """One-line errors for the caller's mistakes."""
    if text.ndim != 2 or text.shape[1] != model.shape.text_len:
        raise ValueError(
            f"text must be (batch, {model.shape.text_len}) token ids, got {tuple(text.shape)}"
        )
    if kw["temperature"] < 0:
        raise ValueError(f"temperature must be >= 0, got {kw['temperature']}")
    if kw["top_k"] is not None and kw["top_k"] < 1:
        raise ValueError(f"top_k must be >= 1, got {kw['top_k']}")
    if kw["top_p"] is not None and not 0 < kw["top_p"] <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {kw['top_p']}")
    gens = kw["generators"]
    if gens is not None and not isinstance(gens, torch.Generator) and len(gens) != len(text):
        raise ValueError(f"got {len(gens)} generators for {len(text)} rows")
    keep, init = kw["keep"], kw["init_codes"]
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
    null_text: torch.Tensor | None = None,
    generators: Generators = None,
    init_codes: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    use_cache: bool = True,
    progress: bool = False,
    autocast: bool | None = None,
) -> torch.Tensor:
    """Sample codes (B, N) for captions ``text`` (B, L); rows may hold different captions.

    temperature: divides the logits before the filters; 0 = greedy.
    top_k, top_p: filters over the image vocabulary (see :func:`filter_logits`).
    cond_scale: classifier-free guidance scale; 1 = plain conditional sampling.
    null_text:  the empty caption (L,) used for the unconditional rows.
    generators: one generator, or one per row (a row then samples the same codes
                whatever else is in the batch).
    keep:       bool (B, N); where True the code is forced to ``init_codes``.
    use_cache:  False recomputes the whole stream at every step (tests / benchmarks).
    autocast:   bf16 autocast for the transformer; None = on for CUDA devices with bf16.
    """
    _check(
        text,
        model,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generators=generators,
        keep=keep,
        init_codes=init_codes,
    )
    guided = cond_scale != 1.0
    if guided and null_text is None:
        raise ValueError("classifier-free guidance needs null_text (the all-pads caption)")
    device = text.device
    if autocast is None:
        autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(autocast)),
    ):
        codes = _sample_loop(
            model,
            text,
            null_text.to(text).expand_as(text) if guided else None,
            cond_scale=cond_scale,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generators=generators,
            init_codes=init_codes,
            keep=keep,
            use_cache=use_cache,
            progress=progress,
        )
    return codes.clone()  # a normal tensor again (inference-mode tensors refuse in-place edits)


def _sample_loop(
    model: DALLE,
    text: torch.Tensor,
    null_rows: torch.Tensor | None,
    *,
    cond_scale: float,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generators: Generators,
    init_codes: torch.Tensor | None,
    keep: torch.Tensor | None,
    use_cache: bool,
    progress: bool,
) -> torch.Tensor:
    """The loop itself (run under inference mode and maybe autocast)."""
    B, N = text.shape[0], model.shape.num_codes
    guided = null_rows is not None
    rows = torch.cat([text, null_rows]) if guided else text  # 2B rows: conditional, then not
    codes = torch.zeros(B, N, dtype=torch.long, device=text.device)

    def next_code(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # guidance, filters and draws in float32, whatever autocast did
        if guided:
            cond, uncond = logits.chunk(2)
            logits = uncond + cond_scale * (cond - uncond)
        if temperature == 0:
            return logits.argmax(-1)
        return pick(filter_logits(logits / temperature, top_k, top_p), 1.0, generators)

    def doubled(x: torch.Tensor) -> torch.Tensor:  # the same codes feed both streams
        return torch.cat([x, x]) if guided else x

    if use_cache:
        logits, cache = model.prefill(rows)
    else:
        logits = model.next_logits_uncached(rows, doubled(codes[:, :0]))
    for t in tqdm(range(N), desc="sampling", disable=not progress, leave=False):
        code = next_code(logits)
        if keep is not None:
            code = torch.where(keep[:, t], init_codes[:, t], code)
        codes[:, t] = code
        if t == N - 1:
            break
        if use_cache:
            logits, cache = model.step(doubled(code), t, cache)
        else:
            logits = model.next_logits_uncached(rows, doubled(codes[:, : t + 1]))
    return codes
