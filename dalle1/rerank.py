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


def rank(scores: torch.Tensor, group_size: int, keep: int | None = None) -> torch.Tensor:
    """Indices that sort each consecutive group of ``group_size`` scores best first, keeping ``keep``.

    scores: (G · group_size,). Returns (G · keep,) indices into ``scores``; within a group
    they are a permutation of that group's indices (truncated to ``keep``), scores descending.
    Ties keep the original order (stable sort), so the result is deterministic.
    """
    keep = group_size if keep is None else keep
    if not 1 <= keep <= group_size:
        raise ValueError(f"keep must lie in [1, num_images={group_size}], got {keep}")
    if scores.numel() % group_size != 0:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    grouped = scores.detach().float().cpu().view(-1, group_size)
    order = grouped.argsort(dim=-1, descending=True, stable=True)[:, :keep]
    offsets = torch.arange(len(grouped))[:, None] * group_size
    return (order + offsets).flatten()


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
