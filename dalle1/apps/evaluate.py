"""``dalle1 eval``: held-out bits per token and the scorer's figures with and without reranking.

The figures (docs/rerank.md says what each one means): the transformer's held-out
cross-entropy (:func:`dalle1.evaluation.evaluate_dalle`); for a folder with
``clip/``, the mean scorer cosine of all samples and of the reranked best ones,
how often a sample's best caption among the prompts is its own, and, for prompts
with labels, zero-shot label accuracy (:func:`dalle1.clip.zero_shot`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..clip import zero_shot
from ..data import CaptionedFolder, find_pairs, split_pairs
from ..evaluation import encode_dataset, evaluate_dalle
from ..files import read_text
from ..pipeline import DALLEPipeline
from ..rerank import rank
from ..sampling import SamplingOptions


def read_prompts(path: str | Path) -> list[dict[str, str | None]]:
    """Prompts with optional labels: JSONL ``{"prompt": ..., "label": ...}``, or text lines
    ``label<TAB>prompt`` / ``prompt``. Blank lines and ``#`` comments are skipped."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompts file '{path}' does not exist")
    rows = []
    for n, line in enumerate(read_text(path, "list").splitlines(), 1):  # regular file, UTF-8
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise ValueError(f'{path}:{n}: a JSON line needs a "prompt" string')
            rows.append({"prompt": item["prompt"], "label": item.get("label")})
        elif "\t" in line:
            label, prompt = line.split("\t", 1)
            rows.append({"prompt": prompt.strip(), "label": label.strip() or None})
        else:
            rows.append({"prompt": line, "label": None})
    if not rows:
        raise ValueError(f"prompts file '{path}' holds no prompt")
    return rows


@torch.no_grad()
def evaluate(
    pipe: DALLEPipeline,
    data: str | Path,
    prompts: list[dict[str, str | None]],
    *,
    num_images: int = 32,
    keep: int = 4,
    split: str = "val",
    max_pairs: int = 1024,
    templates: list[str] | None = None,
    seed: int = 0,
    batch_prompts: int = 4,
    progress: bool = True,
    options: SamplingOptions = SamplingOptions(),
) -> dict[str, Any]:
    """The figures of ``dalle1 eval`` (see docs/rerank.md for what each one means).

    Candidates are sampled with ``options``; image ``i`` of prompt ``p`` uses seed
    ``seed + p * num_images + i``.
    """
    if split not in ("val", "all"):
        raise ValueError(f"split must be 'val' or 'all', got {split!r}")
    if not 1 <= keep <= num_images:
        raise ValueError(f"keep must lie in [1, num_images={num_images}], got {keep}")
    pairs = find_pairs(data)
    if split == "val":
        d = pipe.config.data
        _, pairs = split_pairs(pairs, d.val_fraction, d.seed)
        if not pairs:
            raise ValueError(f"no held-out pairs in '{data}' (data.val_fraction={d.val_fraction})")
    pairs = pairs[:max_pairs]
    held = CaptionedFolder(None, pipe.vae.cfg.image_size, pairs)
    codes = encode_dataset(pipe.vae, held, progress=False)
    nll = evaluate_dalle(pipe.dalle, pipe.tokenizer, codes, held.captions)
    result: dict[str, Any] = {
        "model": str(pipe.folder or ""),
        "data": str(data),
        "split": split,
        "held_out_pairs": len(held),
        "image_bits_per_token": nll["val_image_bits_per_token"],
        "text_bits_per_token": nll["val_text_bits_per_token"],
        "image_bits_per_image": nll["val_image_bits_per_token"] * pipe.dalle.shape.num_codes,
        "num_prompts": len(prompts),
        "num_images": num_images,
        "keep": keep,
        "scorer": "clip" if pipe.clip is not None else None,
    }
    if pipe.clip is None:
        result["note"] = "no clip/ in the model folder: scorer figures need train stage clip"
        return result
    clip = pipe.clip
    texts = [p["prompt"] for p in prompts]
    labels = sorted({p["label"] for p in prompts if p["label"]})
    templates = templates or ["{}"]
    prompt_emb = clip.encode_text(pipe.tokenizer.encode(texts))
    all_scores, top_scores = [], []
    caption_all, caption_top, label_all, label_top = [], [], [], []
    for start in tqdm(
        range(0, len(prompts), batch_prompts), desc="eval prompts", disable=not progress
    ):
        chunk = prompts[start : start + batch_prompts]
        out = pipe(
            [p["prompt"] for p in chunk],
            num_images=num_images,
            seed=seed + start * num_images,
            options=options,
            rerank=False,  # every candidate comes back: the figures rerank them here
        )
        images = out.pixels
        emb = clip.encode_image(images)
        own = torch.arange(start, start + len(chunk)).repeat_interleave(num_images)
        scores = (emb * prompt_emb[own]).sum(-1).cpu()
        top = rank(scores, num_images, keep)
        is_top = torch.zeros(len(scores), dtype=torch.bool)
        is_top[top] = True
        all_scores.append(scores)
        top_scores.append(scores[top])
        # caption match: the sample's best caption among all distinct prompts is its own
        best = (emb @ prompt_emb.t()).argmax(-1).cpu()
        match = torch.tensor([texts[int(b)] == texts[int(o)] for b, o in zip(best, own)])
        caption_all.append(match)
        caption_top.append(match[is_top])
        if labels:
            probs = zero_shot(clip, pipe.tokenizer, images, labels, templates)
            guess = [labels[int(i)] for i in probs.argmax(-1)]
            want = [prompts[int(o)]["label"] for o in own]
            has = torch.tensor([w is not None for w in want])
            ok = torch.tensor([g == w for g, w in zip(guess, want)])
            label_all.append(ok[has])
            label_top.append(ok[has & is_top])

    def mean(parts: list[torch.Tensor]) -> float | None:
        cat = torch.cat(parts).float() if parts else torch.zeros(0)
        return cat.mean().item() if len(cat) else None

    result.update(
        {
            "score_mean_all": mean(all_scores),
            "score_mean_reranked": mean(top_scores),
            "caption_match_all": mean(caption_all),
            "caption_match_reranked": mean(caption_top),
            "labels": labels,
            "label_templates": templates,
            "label_match_all": mean(label_all),
            "label_match_reranked": mean(label_top),
        }
    )
    return result
