"""Sampling image codes one by one in raster order (paper section 2.2 / 2.3).

The caption is read once (``prefill``); after that every step feeds one code
and reads the logits of the next one from the key/value cache. Filters act on
the *image* vocabulary only, because the image head has no text logits at all.

Classifier-free guidance runs the conditional and the unconditional (empty
caption = all per-position pads) streams as one batch of 2B rows, each row
with its own cache, and mixes ``uncond + s · (cond − uncond)``. Nothing the
caller passed in is modified.

Editing is built in: ``keep`` marks codes that must stay equal to
``init_codes``; the sampler forces them as it passes them, so later codes
condition on them exactly as if they had been sampled.
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
    """Keep the ``top_k`` largest logits and/or the smallest set with probability ≥ ``top_p``."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (
            cum - sorted_logits.softmax(-1)
        ) >= top_p  # keep the token that crosses top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick(logits: torch.Tensor, temperature: float, generators: Generators) -> torch.Tensor:
    """Draw one code per row; temperature 0 is greedy. A list of generators seeds each row alone."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    if isinstance(generators, torch.Generator) or generators is None:
        return torch.multinomial(probs, 1, generator=generators).squeeze(-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


@torch.no_grad()
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
) -> torch.Tensor:
    """Sample codes (B, N) for captions ``text`` (B, L).

    cond_scale: classifier-free guidance scale; 1 = plain conditional sampling.
    null_text:  the empty caption (L,) used for the unconditional stream.
    keep:       bool (B, N); where True the code is forced to ``init_codes``.
    use_cache:  False recomputes the whole stream at every step (for tests / benchmarks).
    """
    B, N = text.shape[0], model.shape.num_codes
    guided = cond_scale != 1.0
    if guided and null_text is None:
        raise ValueError("classifier-free guidance needs null_text (the all-pads caption)")
    rows = torch.cat([text, null_text.to(text).expand_as(text)]) if guided else text
    codes = torch.zeros(B, N, dtype=torch.long, device=text.device)

    def mix(logits: torch.Tensor) -> torch.Tensor:
        if not guided:
            return logits
        cond, uncond = logits.float().chunk(2)
        return uncond + cond_scale * (cond - uncond)

    logits, cache = (
        model.prefill(rows) if use_cache else (model.next_logits_uncached(rows, codes[:, :0]), None)
    )
    for t in tqdm(range(N), desc="sampling", disable=not progress, leave=False):
        code = pick(filter_logits(mix(logits), top_k, top_p), temperature, generators)
        if keep is not None:
            code = torch.where(keep[:, t], init_codes[:, t], code)
        codes[:, t] = code
        if t == N - 1:
            break
        if use_cache:
            logits, cache = model.step(code.repeat(2) if guided else code, t, cache)
        else:
            prefix = codes[:, : t + 1]
            logits = model.next_logits_uncached(rows, prefix.repeat(2, 1) if guided else prefix)
    return codes
