"""Recommended sampling settings: chosen by measurement, carried by the model folder.

A trained model samples best with settings nobody knows in advance: how much
classifier-free guidance, which filters, how many candidates to rerank (paper
section 2.6 samples many and keeps the best by CLIP). Training ends by choosing
them (:func:`choose`) and writes them to ``model/sampling.json``; the pipeline,
``dalle1 sample`` / ``edit`` and the UI use them whenever the caller gives none.

The choice is a small sweep over held-out captions (the ``sample:`` section of the
config, :class:`dalle1.config.SampleConfig`): every combination of option values is
sampled, each image is scored by the model's own **judge** and the simplest setting
whose mean score lies within one standard error of the best one wins (the "one
standard error" rule: a noisy sweep should not buy extra guidance or extra candidates
for a difference it cannot resolve). The judge asks, for each image, whether its own
caption fits it better than every one of its **rivals**: the held-out captions nearest
to it in words changed ("a large red circle" against "a large blue circle", "a small
red circle", ...), so that a picture is only right when every attribute its caption
names is (the share of images that beat all their rivals is the setting's score:
"samples matching their caption"). Rivals far from the caption would pass a picture
with the wrong colour as long as its shape and place differ from theirs.

* with a contrastive scorer (``clip/``): by the cosine of image and caption;
* without one: by the transformer's log-likelihood of the image's codes given each
  caption, after decoding the image to pixels and encoding it again with the dVAE
  (so the judge reads the picture, not the sampler's own tokens).

``sampling.json`` holds the chosen :class:`~dalle1.sampling.SamplingOptions` as a plain
mapping (any field that class has; fields it does not know are ignored with a
warning, missing ones take its defaults), the rerank pool ``candidates`` (images
sampled per image returned) and the sweep's table, so the figures that chose the
settings travel with them.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .clip import CLIPScorer
from .files import atomic_write
from .rerank import candidate_scores, rank
from .sampling import SamplingOptions, sample_codes
from .text import TextTokenizer
from .transformer import DALLE
from .vae import DiscreteVAE

FILE = "sampling.json"


@dataclass(frozen=True)
class Recommended:
    """How to sample from a model unless told otherwise.

    options:    the sampler's options (temperature, filters, guidance, ...).
    candidates: images sampled per image returned; the best by the folder's scorer are
                kept (1 = no reranking).
    judge:      what scored the sweep ("clip", "likelihood"), "" when not measured.
    sweep:      one row per setting tried: its options, candidates, score and stderr.
    """

    options: SamplingOptions = field(default_factory=SamplingOptions)
    candidates: int = 1
    judge: str = ""
    sweep: tuple[dict, ...] = ()
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "options": asdict(self.options),
            "candidates": self.candidates,
            "judge": self.judge,
            "note": self.note,
            "sweep": list(self.sweep),
        }

    def describe(self) -> str:
        """One line for logs and the UI, e.g. 'cond_scale=3.0, best 1 of 4 by clip'."""
        default = asdict(SamplingOptions())
        changed = {k: v for k, v in asdict(self.options).items() if v != default[k]}
        parts = [f"{k}={v}" for k, v in changed.items()] or ["plain sampling"]
        if self.candidates > 1:
            parts.append(f"best 1 of {self.candidates} by {self.judge or 'the scorer'}")
        return ", ".join(parts)


def options_from_dict(values: dict[str, Any], where: str = FILE) -> SamplingOptions:
    """A mapping of option names -> :class:`SamplingOptions`; unknown names warn, missing
    ones keep the defaults, bad values raise a one-line ValueError naming ``where``."""
    known = {f.name for f in fields(SamplingOptions)}
    unknown = sorted(set(values) - known)
    if unknown:
        warnings.warn(
            f"{where}: ignoring sampling options this dalle1 does not know: {', '.join(unknown)}",
            stacklevel=2,
        )
    try:
        options = SamplingOptions(**{k: v for k, v in values.items() if k in known})
        options.check()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
    return options


def save_recommended(folder: str | Path, recommended: Recommended) -> Path:
    """Write ``folder/sampling.json`` atomically."""
    text = json.dumps(recommended.to_dict(), indent=2) + "\n"
    return atomic_write(Path(folder) / FILE, lambda fh: fh.write(text.encode()))


def load_recommended(folder: str | Path) -> Recommended:
    """``folder/sampling.json``, or plain sampling when the folder has none (older folders)."""
    path = Path(folder) / FILE
    if not path.exists():
        return Recommended(note=f"no {FILE} in the model folder: plain sampling")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"'{path}' is not valid JSON ({err})") from None
    candidates = int(data.get("candidates", 1))
    if candidates < 1:
        raise ValueError(f"'{path}': candidates must be >= 1, got {candidates}")
    return Recommended(
        options_from_dict(data.get("options", {}), str(path)),
        candidates,
        str(data.get("judge", "")),
        tuple(data.get("sweep", ())),
        str(data.get("note", "")),
    )


# --- the judge ----------------------------------------------------------------------------


def words_changed(a: str, b: str) -> int:
    """Word-level edit distance: words inserted, deleted or replaced to turn ``a`` into ``b``."""
    x, y = a.split(), b.split()
    row = list(range(len(y) + 1))
    for i, word in enumerate(x, 1):
        diagonal, row[0] = row[0], i
        for j, other in enumerate(y, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (word != other))
    return row[-1]


def nearest_rivals(
    prompts: list[str], held_out: list[list[str]] | None = None, count: int = 7
) -> list[list[str]]:
    """For each prompt, ``count`` rival captions: the held-out caption lines nearest to it in
    words changed ("a large red circle" -> "a large blue circle", "a small red circle").

    Near rivals make the judge check every attribute the caption names: a picture with the
    wrong colour still beats a rival that differs in shape, size and place, not one that
    differs in colour alone. ``held_out`` holds each held-out image's caption lines; a
    line that shares an image with the prompt is a paraphrase ("a red circle" for "a small
    red circle on the left"), true of the same picture, so it is never a rival. Without
    ``held_out`` the rivals are the other prompts. Ties break alphabetically.
    """
    groups = [list(g) for g in (held_out or [])] + [[p] for p in prompts]
    pool = sorted({line for g in groups for line in g})
    same_image: dict[str, set[str]] = {}
    for g in groups:
        for line in g:
            same_image.setdefault(line, set()).update(g)
    chosen = []
    for p in prompts:
        others = [c for c in pool if c not in same_image[p]]
        if not others:
            raise ValueError("the judge needs at least two distinct captions")
        chosen.append(heapq.nsmallest(count, others, key=lambda c: (words_changed(p, c), c)))
    return chosen


@torch.no_grad()
def judge_images(
    images: torch.Tensor,
    own: torch.Tensor,
    prompts: list[str],
    tokenizer: TextTokenizer,
    clip: CLIPScorer | None = None,
    dalle: DALLE | None = None,
    vae: DiscreteVAE | None = None,
    rivals: list[list[str]] | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """The judge's verdict on each image (M, 3, H, W) for its own caption ``prompts[own]``:
    1 when the caption fits it better than every one of its rivals, else 0: (M,).

    ``rivals[j]`` are prompt j's rival captions (default :func:`nearest_rivals` among the
    prompts). Fit is the clip cosine of image and caption, or without a scorer the
    transformer's summed log-likelihood of the image's re-encoded codes given the caption
    (one forward pass per image and caption).
    """
    rivals = rivals if rivals is not None else nearest_rivals(prompts)
    width = min(len(r) for r in rivals)
    if width < 1:
        raise ValueError("the judge needs at least one rival caption per prompt")
    texts = list(dict.fromkeys([*prompts, *(c for r in rivals for c in r)]))
    index = {t: i for i, t in enumerate(texts)}
    table = torch.tensor(
        [[index[p]] + [index[c] for c in r[:width]] for p, r in zip(prompts, rivals)]
    )
    columns = table.to(images.device)[own.to(images.device)]  # (M, 1 + width): own, rivals
    text = tokenizer.encode(texts).to(images.device)
    if clip is not None:
        fit = (clip.encode_image(images) @ clip.encode_text(text).t()).gather(1, columns)
    else:
        if dalle is None or vae is None:
            raise ValueError("the likelihood judge needs the transformer and the dVAE")
        codes = vae.encode(images.clamp(0, 1))
        image_rows = torch.arange(len(codes), device=codes.device)[:, None].expand_as(columns)
        flat_i, flat_j = image_rows.flatten(), columns.flatten()
        fit = torch.cat(
            [
                dalle.code_log_likelihood(text[j], codes[i]).sum(-1)
                for i, j in zip(flat_i.split(batch_size), flat_j.split(batch_size))
            ]
        ).view(columns.shape)
    mine, others = fit[:, :1], fit[:, 1:]
    return (others < mine).all(1).float()


# --- the sweep ----------------------------------------------------------------------------


def settings(options: dict[str, Any], sweep: dict[str, list]) -> list[SamplingOptions]:
    """Every combination of the ``sweep`` values on top of ``options``, simplest first
    (the first value of each option is its simplest; earlier options vary slowest)."""
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"sample.sweep.{key}: expected a non-empty list of values")
    keys = list(sweep)
    combos = itertools.product(*(sweep[k] for k in keys)) if keys else [()]
    return [
        options_from_dict({**options, **dict(zip(keys, combo))}, "sample.sweep") for combo in combos
    ]


@dataclass
class SweepRow:
    options: SamplingOptions
    candidates: int
    score: float
    stderr: float
    images: int
    complexity: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "options": asdict(self.options),
            "candidates": self.candidates,
            "score": round(self.score, 4),
            "stderr": round(self.stderr, 4),
            "images": self.images,
        }


def one_standard_error(rows: list[SweepRow]) -> SweepRow:
    """The simplest row whose score is within one standard error of the best row's."""
    best = max(rows, key=lambda r: r.score)
    good = [r for r in rows if r.score >= best.score - best.stderr]
    return min(good, key=lambda r: r.complexity)


@torch.no_grad()
def choose(
    dalle: DALLE,
    vae: DiscreteVAE,
    tokenizer: TextTokenizer,
    prompts: list[str],
    *,
    clip: CLIPScorer | None = None,
    options: dict[str, Any] | None = None,
    sweep: dict[str, list] | None = None,
    candidates: list[int] = (1,),
    images: int = 8,
    held_out: list[list[str]] | None = None,
    rivals_per_image: int = 7,
    seed: int = 0,
    batch_size: int = 64,
    log=None,
) -> Recommended:
    """Sample ``images`` × max(``candidates``) images per held-out caption for every setting,
    judge them (module docstring) and return the simplest setting within one standard
    error of the best.

    For ``c`` in ``candidates`` the pool of each caption is cut into groups of ``c``; the
    group's best by the reranker (:func:`dalle1.rerank.candidate_scores`: the clip
    scorer, else the transformer's likelihood) is the image that setting returns.
    Each image's rivals are the ``rivals_per_image`` captions nearest its own among the
    ``held_out`` images' caption lines (:func:`nearest_rivals`).
    ``log(line)`` receives one line per setting.
    """
    prompts = list(dict.fromkeys(p for p in prompts if p.strip()))
    if len(prompts) < 2:
        raise ValueError("choosing sampling settings needs at least two distinct held-out captions")
    candidates = sorted({int(c) for c in candidates}) or [1]
    if candidates[0] < 1:
        raise ValueError(f"sample.candidates must be >= 1, got {candidates}")
    judge = "clip" if clip is not None else "likelihood"
    base, grid = dict(options or {}), dict(sweep or {})
    tried = settings(base, grid)
    if not grid:  # nothing to choose: the options as given
        return Recommended(tried[0], candidates[0], "", (), "sample.sweep is empty: as configured")
    device = next(dalle.parameters()).device
    pool = images * math.lcm(*candidates)  # every c in candidates cuts it into whole groups
    rows_text = [p for p in prompts for _ in range(pool)]
    own = torch.tensor([j for j in range(len(prompts)) for _ in range(pool)], device=device)
    seeds = [seed + i for i in range(len(rows_text))]  # the same draws for every setting
    null = tokenizer.pad_row().to(device)
    rivals = nearest_rivals(prompts, held_out, rivals_per_image)
    table: list[SweepRow] = []
    for index, opts in enumerate(tried):
        codes = []
        for lo in range(0, len(rows_text), batch_size):
            text = tokenizer.encode(rows_text[lo : lo + batch_size]).to(device)
            gens = [torch.Generator(device).manual_seed(s) for s in seeds[lo : lo + batch_size]]
            codes.append(sample_codes(dalle, text, **asdict(opts), null_text=null, generators=gens))
        all_codes = torch.cat(codes)
        pixels = torch.cat([vae.decode(c).clamp(0, 1) for c in all_codes.split(batch_size)])
        fit = judge_images(pixels, own, prompts, tokenizer, clip, dalle, vae, rivals)
        text_all = tokenizer.encode(rows_text).to(device)
        rerank_scores = candidate_scores(pixels, text_all, all_codes, dalle, clip)
        for c in candidates:
            picked = rank(rerank_scores, c, keep=1) if c > 1 else torch.arange(len(fit))
            values = fit[picked.to(fit.device)].float()
            se = (
                float(values.std(unbiased=True) / math.sqrt(len(values)))
                if len(values) > 1
                else 0.0
            )
            row = SweepRow(
                opts, c, float(values.mean()), se, len(values), (candidates.index(c), index)
            )
            table.append(row)
            if log is not None:
                log(
                    f"  {Recommended(opts, c, judge).describe():<40} {row.score:.3f} ± {row.stderr:.3f}"
                )
    chosen = one_standard_error(table)
    note = (
        f"chosen at the end of training: {len(prompts)} held-out captions x {images} images per "
        f"setting, judged by {judge}; the simplest setting within one standard error of the best"
    )
    return Recommended(
        chosen.options, chosen.candidates, judge, tuple(r.to_dict() for r in table), note
    )
