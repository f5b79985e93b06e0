"""Reranking candidates: sample many images per caption, keep the best (paper section 2.6).

DALL-E 1 reranks its samples with CLIP; the blog shows the best 32 of 512.
A candidate's score is the :class:`~dalle1.clip.CLIPScorer`'s cosine of image
and caption when the model folder has ``clip/``, else the transformer's own mean
log-likelihood of the candidate's codes given the caption
(:func:`likelihood_scores`, nats per code). :func:`rank` then orders each
prompt's group of candidates best first.
"""

from __future__ import annotations

import torch

from .clip import CLIPScorer
from .transformer import DALLE


def rank(
    scores: torch.Tensor,
    group_size: int,
    keep: int | None = None,
    codes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices that sort each consecutive group of ``group_size`` scores best first, keeping ``keep``.

    scores: (G · group_size,). Returns (G · keep,) indices into ``scores``; within a group
    they are a permutation of that group's indices (truncated to ``keep``), scores descending.
    Ties keep the original order (stable sort), so the result is deterministic.

    ``codes`` (G · group_size, N): a candidate whose codes repeat a better one of its group
    goes behind every distinct candidate, so the best ``keep`` are distinct images whenever
    the group holds that many (a peaked model samples the same likeliest image more than once).
    """
    keep = group_size if keep is None else keep
    if not 1 <= keep <= group_size:
        raise ValueError(f"keep must lie in [1, num_images={group_size}], got {keep}")
    if scores.numel() % group_size != 0:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    grouped = scores.detach().float().cpu().view(-1, group_size)
    order = grouped.argsort(dim=-1, descending=True, stable=True)
    if codes is not None:
        order = torch.stack(
            [
                _distinct_first(row, codes.detach().cpu().view(len(grouped), group_size, -1)[g])
                for g, row in enumerate(order)
            ]
        )
    offsets = torch.arange(len(grouped))[:, None] * group_size
    return (order[:, :keep] + offsets).flatten()


def _distinct_first(order: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``order`` (best first) with every repeat of an earlier candidate's codes moved last."""
    seen: set[bytes] = set()
    first, repeats = [], []
    for i in order.tolist():
        key = codes[i].numpy().tobytes()
        (repeats if key in seen else first).append(i)
        seen.add(key)
    return torch.tensor(first + repeats, dtype=order.dtype)


def count_distinct(codes: torch.Tensor) -> int:
    """How many different code grids ``codes`` (B, N) holds."""
    return len({row.numpy().tobytes() for row in codes.detach().cpu()})


@torch.no_grad()
def likelihood_scores(dalle: DALLE, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The transformer's own mean log p(code | caption, earlier codes), nats per code: (B,)."""
    return dalle.code_log_likelihood(text, codes).mean(-1)


@torch.no_grad()
def candidate_scores(
    images: torch.Tensor,
    text: torch.Tensor,
    codes: torch.Tensor,
    dalle: DALLE,
    clip: CLIPScorer | None = None,
) -> torch.Tensor:
    """One score per candidate (B,): the clip cosine of image and caption, or without a
    scorer the transformer's mean log-likelihood of the codes (:func:`likelihood_scores`)."""
    if clip is not None:
        return clip.similarity(images, text)
    return likelihood_scores(dalle, text, codes)
