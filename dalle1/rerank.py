"""A small CLIP-style scorer, candidate ranking, zero-shot labels, evaluation and dataset synthesis.

DALL-E 1 (paper section 2.6, "Sample Generation", and figure 9) draws many
candidates per caption and reranks them with a pretrained contrastive model
(CLIP, Radford et al. 2021); the blog shows the best 32 of 512. No CLIP
weights can be downloaded here, so this module trains its own on the same
captioned data:

* **Text encoder**: the transformer's own BPE ids (same ``tokenizer.json``,
  same per-position pads), a learned position per slot, an x-transformers
  bidirectional ``Encoder`` with the pads masked out, mean-pooled over a
  learned ``[cls]`` slot and the real tokens.
* **Image encoder: pixels, not VAE codes.** (1) The scorer then judges what
  the user actually sees, decoding errors of the VAE included; a code-level
  scorer would be blind to them. (2) ``classify``, ``eval`` and ``synth`` can
  score *any* image file without first pushing it through the VAE. (3) The
  scorer stays valid when the image tokenizer is retrained, and it is what
  the paper's CLIP reads. At 32 px a few strided convolutions cost about as
  much as embedding the 64 codes would. The final feature map is flattened
  (not averaged), so "at the top left" stays visible to the projection.
* **Loss**: symmetric InfoNCE with a learned temperature (CLIP section 2.3;
  logit scale initialised at 1/0.07 and clipped at 100). Captions in small
  datasets repeat inside a batch ("a red circle" twice); such pairs count as
  matches instead of as negatives (:func:`clip_loss` ``same=``).

The score of an (image, caption) pair is the cosine similarity of their
embeddings, in [-1, 1]. Without a scorer the pipeline ranks candidates by the
transformer's own mean log-likelihood of their codes given the caption
(:func:`self_scores`), in nats per code.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from x_transformers import Encoder

from .checkpoint import ModelFolderError, read_json, save_component
from .config import CLIPConfig, Config, build_section
from .files import atomic_folder, atomic_write
from .text import TextTokenizer

if TYPE_CHECKING:
    from PIL import Image

    from .pipeline import DALLEPipeline
    from .transformer import DALLE

MAX_LOGIT_SCALE = 100.0  # CLIP: the learned temperature is clipped so logits never exceed 100x

# --- the loss ----------------------------------------------------------------------------


def clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    same: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP section 2.3): mean of image->text and text->image cross-entropy.

    image_emb, text_emb: (B, D) L2-normalised rows; row i of each is a matching pair.
    logit_scale: the *log* of the inverse temperature (logits = exp(scale) · cos).
    same: optional bool (B, B), True where caption j also describes image i (e.g. the same
          text); the target of row i is then spread uniformly over those columns. Default:
          the identity, which is plain InfoNCE.
    """
    scale = torch.as_tensor(logit_scale, dtype=image_emb.dtype, device=image_emb.device)
    logits = scale.exp() * image_emb @ text_emb.t()
    if same is None:
        target = torch.arange(len(logits), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    same = same.to(logits.device, torch.bool) | torch.eye(
        len(logits), dtype=torch.bool, device=logits.device
    )
    soft = same.float() / same.float().sum(-1, keepdim=True)
    soft_t = same.t().float() / same.t().float().sum(-1, keepdim=True)
    i2t = -(soft * logits.log_softmax(-1)).sum(-1).mean()
    t2i = -(soft_t * logits.t().log_softmax(-1)).sum(-1).mean()
    return 0.5 * (i2t + t2i)


def same_text(text: torch.Tensor) -> torch.Tensor:
    """(B, L) token ids -> bool (B, B): True where two rows are the same caption."""
    return (text[:, None, :] == text[None, :, :]).all(-1)


# --- the model ---------------------------------------------------------------------------


class ImageEncoder(nn.Module):
    """Strided convolutions over pixels in [0, 1]; the last feature map is flattened."""

    def __init__(self, cfg: CLIPConfig, image_size: int):
        super().__init__()
        if image_size % (2**cfg.image_downsamples) != 0:
            raise ValueError(
                f"clip.image_size={image_size} is not divisible by 2**clip.image_downsamples="
                f"{2**cfg.image_downsamples}"
            )
        c = cfg.image_channels
        layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1), nn.GELU()]
        for _ in range(cfg.image_downsamples):
            layers += [
                nn.Conv2d(c, 2 * c, 4, stride=2, padding=1),
                nn.GroupNorm(8 if (2 * c) % 8 == 0 else 1, 2 * c),
                nn.GELU(),
                nn.Conv2d(2 * c, 2 * c, 3, padding=1),
                nn.GELU(),
            ]
            c *= 2
        self.convs = nn.Sequential(*layers)
        side = image_size // 2**cfg.image_downsamples
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.LayerNorm(c * side * side),
            nn.Linear(c * side * side, cfg.dim),
            nn.GELU(),
            nn.Linear(cfg.dim, cfg.embed_dim),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(images * 2 - 1))


class TextEncoder(nn.Module):
    """BPE ids (B, L) -> (B, embed_dim): bidirectional transformer, pads masked, mean-pooled."""

    def __init__(self, cfg: CLIPConfig, text_vocab: int, text_len: int, bpe_vocab: int):
        super().__init__()
        self.bpe_vocab = bpe_vocab
        self.token_emb = nn.Embedding(text_vocab, cfg.dim)
        self.pos_emb = nn.Embedding(text_len + 1, cfg.dim)  # [cls] + L slots
        self.cls = nn.Parameter(torch.randn(cfg.dim) * 0.02)
        self.encoder = Encoder(
            dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, attn_dim_head=cfg.dim_head
        )
        self.proj = nn.Linear(cfg.dim, cfg.embed_dim)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        b, n = text.shape
        x = torch.cat([self.cls.expand(b, 1, -1), self.token_emb(text)], dim=1)
        x = x + self.pos_emb(torch.arange(n + 1, device=text.device))
        mask = torch.cat([torch.ones_like(text[:, :1], dtype=torch.bool), text < self.bpe_vocab], 1)
        h = self.encoder(x, mask=mask)
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.proj(pooled)


class CLIPScorer(nn.Module):
    """The contrastive scorer: ``similarity(images, text)`` is the cosine of the two embeddings."""

    def __init__(
        self, cfg: CLIPConfig, text_vocab: int, text_len: int, bpe_vocab: int, image_size: int
    ):
        super().__init__()
        self.cfg = cfg
        self.text_vocab, self.text_len, self.bpe_vocab = text_vocab, text_len, bpe_vocab
        self.image_size = image_size
        self.image_encoder = ImageEncoder(cfg, image_size)
        self.text_encoder = TextEncoder(cfg, text_vocab, text_len, bpe_vocab)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))

    def export_config(self) -> dict:
        return {
            **asdict(self.cfg),
            "text_vocab": self.text_vocab,
            "text_len": self.text_len,
            "bpe_vocab": self.bpe_vocab,
            "image_size": self.image_size,
        }

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> clamped and resized to the encoder's size."""
        images = images.float().clamp(0, 1).to(self.device)
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(
                images, size=(self.image_size,) * 2, mode="bilinear", antialias=True
            )
        return images

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_encoder(self.prepare(images)), dim=-1)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_encoder(text.to(self.device)), dim=-1)

    def clamped_scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE))

    def forward(
        self, images: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training: -> (symmetric InfoNCE, logs) for a batch of matching (image, caption) rows."""
        img, txt = self.encode_image(images), self.encode_text(text)
        scale = self.clamped_scale()
        loss = clip_loss(img, txt, scale, same_text(text))
        with torch.no_grad():
            acc = ((img @ txt.t()).argmax(-1) == torch.arange(len(img), device=img.device)).float()
        return loss, {"batch_acc": acc.mean(), "temperature": (-scale).exp().detach()}

    @torch.no_grad()
    def similarity(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Row-wise cosine similarity of image i and caption i: (B,)."""
        return (self.encode_image(images) * self.encode_text(text)).sum(-1)


def load_clip(folder: str | Path) -> CLIPScorer:
    """Load ``folder/clip`` (or ``folder`` itself when it holds the clip's config.json)."""
    from .checkpoint import load_weights

    folder = Path(folder)
    sub = folder / "clip" if (folder / "clip").is_dir() else folder
    data = read_json(sub / "config.json")
    try:
        shape = {k: data.pop(k) for k in ("text_vocab", "text_len", "bpe_vocab", "image_size")}
    except KeyError as err:
        raise ModelFolderError(f"'{sub / 'config.json'}' lacks the key {err}") from None
    cfg = build_section(CLIPConfig, data, "clip.")
    return load_weights(CLIPScorer(cfg, **shape), sub).eval()


def check_clip_fits(clip: CLIPScorer, tokenizer: TextTokenizer) -> None:
    for name, a, b in (
        ("text vocabulary", clip.text_vocab, tokenizer.vocab_size),
        ("text length", clip.text_len, tokenizer.text_len),
    ):
        if a != b:
            raise ModelFolderError(
                f"model folder parts disagree: clip {name} = {a} but tokenizer {name} = {b}"
            )


# --- ranking -----------------------------------------------------------------------------


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
def self_scores(dalle: DALLE, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The transformer's own mean log p(code | caption, earlier codes), nats per code: (B,)."""
    return dalle.code_log_likelihood(text, codes).mean(-1)


# --- zero-shot classification --------------------------------------------------------------


def parse_list(value: str) -> list[str]:
    """A comma-separated list, or the path of a file with one item per line."""
    path = Path(value)
    if path.is_file():
        items = [line.strip() for line in path.read_text().splitlines()]
    else:
        items = [item.strip() for item in value.split(",")]
    items = [item for item in items if item and not item.startswith("#")]
    if not items:
        raise ValueError(f"'{value}' names no items (give a comma-separated list or a file)")
    return items


def label_texts(labels: list[str], templates: list[str]) -> list[list[str]]:
    """Every label in every template; each template must contain '{}' exactly once."""
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"template {template!r} must contain '{{}}' exactly once")
    return [[t.format(label).strip() for t in templates] for label in labels]


@torch.no_grad()
def label_embeddings(
    clip: CLIPScorer, tokenizer: TextTokenizer, labels: list[str], templates: list[str]
) -> torch.Tensor:
    """(C, D) class embeddings; several templates are averaged (CLIP's prompt ensembling, §3.1.4)."""
    texts = label_texts(labels, templates)
    for row in texts:
        for text in row:
            if tokenizer.num_tokens(text) == 0:
                raise ValueError(f"label text {text!r} tokenizes to nothing")
    flat = [t for row in texts for t in row]
    emb = clip.encode_text(tokenizer.encode(flat)).view(len(labels), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


@torch.no_grad()
def zero_shot(
    clip: CLIPScorer,
    tokenizer: TextTokenizer,
    images: torch.Tensor,
    labels: list[str],
    templates: list[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """Images (B, 3, H, W) -> class probabilities (B, C): softmax of exp(scale) · cosine."""
    classes = label_embeddings(clip, tokenizer, labels, templates)
    out = []
    for i in range(0, len(images), batch_size):
        img = clip.encode_image(images[i : i + batch_size])
        out.append((clip.clamped_scale().exp() * img @ classes.t()).softmax(-1))
    return torch.cat(out).cpu()


@torch.no_grad()
def retrieval_accuracy(
    clip: CLIPScorer,
    tokenizer: TextTokenizer,
    images: torch.Tensor,
    captions: list[str],
    batch: int = 32,
) -> dict[str, float]:
    """Image -> caption (and caption -> image) top-1 among batches of ``batch`` held-out pairs.

    A pick counts as right when its caption *text* equals the image's own (two images of a
    batch may share a caption; no model could tell those apart).
    """
    hits_i2t = hits_t2i = total = 0
    for i in range(0, len(images) - batch + 1, batch):
        caps = captions[i : i + batch]
        sims = (
            clip.encode_image(images[i : i + batch]) @ clip.encode_text(tokenizer.encode(caps)).t()
        )
        i2t, t2i = sims.argmax(-1).tolist(), sims.argmax(0).tolist()
        hits_i2t += sum(caps[j] == caps[k] for k, j in enumerate(i2t))
        hits_t2i += sum(caps[j] == caps[k] for k, j in enumerate(t2i))
        total += batch
    if total == 0:
        raise ValueError(f"need at least {batch} held-out pairs for retrieval, got {len(images)}")
    return {
        "retrieval_image_to_text": hits_i2t / total,
        "retrieval_text_to_image": hits_t2i / total,
        "retrieval_batch": batch,
        "retrieval_pairs": total,
    }


# --- training (train.py with `train.stage: clip`) -----------------------------------------


def fit_clip(config: Config, out: Path, train_pairs: list, val_pairs: list, ckpt_path) -> Path:
    """Train the scorer on the captioned data and add it as ``clip/`` to ``clip.model``.

    The tokenizer and the text shape come from that model folder, so the scorer reads
    exactly the ids the transformer reads. The folder gains ``clip/`` atomically (written
    under a temporary name, then renamed); nothing else in it changes.
    """
    from .data import CaptionedFolder
    from .training import StageModule, _loader, make_trainer

    model = Path(config.clip.model) if config.clip.model else None
    if model is None:
        raise ValueError(
            "clip.model must name the model folder to add the scorer to (a trained transformer)"
        )
    if not (model / "tokenizer.json").exists() or not (model / "dalle" / "config.json").exists():
        raise ModelFolderError(
            f"clip.model '{model}' is not a model folder with tokenizer.json and dalle/"
        )
    text_len = read_json(model / "dalle" / "config.json")["stream"]["text_len"]
    tokenizer = TextTokenizer.load(model / "tokenizer.json", text_len)
    size = config.clip.image_size or config.data.image_size
    clip = CLIPScorer(
        config.clip, tokenizer.vocab_size, tokenizer.text_len, tokenizer.bpe_vocab_size, size
    )

    class CLIPModule(StageModule):
        def __init__(self):
            super().__init__(config)
            self.clip = clip

        def training_step(self, batch, batch_idx):
            images, text = batch
            loss, logs = self.clip(images, text)
            self.log_dict({"loss": loss, **logs}, prog_bar=True)
            return loss

    def collate(items):
        return torch.stack([im for im, _ in items]), tokenizer.encode([c for _, c in items])

    module = CLIPModule()
    trainer = make_trainer(config, out)
    trainer.fit(
        module,
        _loader(CaptionedFolder(None, size, train_pairs), config, collate),
        ckpt_path=ckpt_path,
        weights_only=True,
    )
    clip = module.clip.eval()
    if not trainer.is_global_zero:
        return model
    held = CaptionedFolder(None, size, val_pairs or train_pairs)
    if len(held) >= 32:
        images = torch.stack([held[i][0] for i in range(len(held))])
        captions = [(c or [""])[0] for c in held.captions]
        metrics = retrieval_accuracy(clip, tokenizer, images, captions)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(json.dumps(metrics))
    with atomic_folder(model / "clip") as tmp:
        save_component(clip, clip.export_config(), tmp)
    return model


# --- prompts files for `dalle1 eval` --------------------------------------------------------


def read_prompts(path: str | Path) -> list[dict[str, str | None]]:
    """Prompts with optional labels: JSONL ``{"prompt": ..., "label": ...}``, or text lines
    ``label<TAB>prompt`` / ``prompt``. Blank lines and ``#`` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file '{path}' does not exist")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
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


# --- `dalle1 eval` --------------------------------------------------------------------------


def _images_tensor(pipe: DALLEPipeline, images: list[Image.Image]) -> torch.Tensor:
    from .images import stack_images

    return stack_images(images, pipe.vae.cfg.image_size)


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
    **sample_kwargs: Any,
) -> dict[str, Any]:
    """The figures of ``dalle1 eval`` (see docs/rerank.md for what each one means)."""
    from tqdm.auto import tqdm

    from .data import CaptionedFolder, find_pairs, split_pairs
    from .training import encode_dataset, evaluate_dalle

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
        "model": str(getattr(pipe, "folder", "")),
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
            **sample_kwargs,
        )
        images = _images_tensor(pipe, out.images)
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


# --- `dalle1 synth` -------------------------------------------------------------------------


def class_seed(base: int, name: str, index: int) -> int:
    """A seed that depends only on (base seed, class name, image index): stable across resumes."""
    return base + (zlib.crc32(name.encode()) % 100_000) * 100_000 + index


def safe_dirname(name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "-_. " else "_" for ch in name).strip()
    if not cleaned or cleaned in (".", ".."):
        raise ValueError(f"class name {name!r} cannot be used as a folder name")
    return cleaned.replace(" ", "_")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash: its image is simply made again
    return rows


@torch.no_grad()
def synthesize(
    pipe: DALLEPipeline,
    classes: list[str],
    templates: list[str],
    per_class: int,
    out: str | Path,
    *,
    min_score: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    **sample_kwargs: Any,
) -> dict[str, Any]:
    """Write an ImageFolder dataset ``out/<class>/NNNNNN.png`` plus ``out/manifest.jsonl``.

    Image ``i`` of class ``c`` uses template ``i mod len(templates)`` and seed
    :func:`class_seed`. Images scoring below ``min_score`` are not written; they are
    logged in ``out/dropped.jsonl`` so that a re-run skips them too. Re-running with the
    same arguments (or a larger ``per_class``) only makes what is missing.
    Scores: the clip cosine if the folder has ``clip/``, else the transformer's mean
    code log-likelihood (nats per code).
    """
    from tqdm.auto import tqdm

    if per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {per_class}")
    if len(set(classes)) != len(classes):
        raise ValueError("class names repeat")
    texts = label_texts(classes, templates)
    folders = {c: safe_dirname(c) for c in classes}
    if len(set(folders.values())) != len(folders):
        raise ValueError("two class names map to the same folder name")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest, dropped_log = out / "manifest.jsonl", out / "dropped.jsonl"
    done = {(r.get("class"), r.get("index")) for r in _read_jsonl(manifest)}
    done |= {(r.get("class"), r.get("index")) for r in _read_jsonl(dropped_log)}
    todo = [
        (c, i, texts[k][i % len(templates)])
        for k, c in enumerate(classes)
        for i in range(per_class)
        if (c, i) not in done
    ]
    kept = dropped = 0
    bar = tqdm(total=len(todo), desc="synth", disable=not progress)
    with manifest.open("a") as man, dropped_log.open("a") as drop:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            seeds = [class_seed(seed, c, i) for c, i, _ in chunk]
            result = pipe(
                [p for _, _, p in chunk], num_images=1, seeds=seeds, score=True, **sample_kwargs
            )
            for (c, i, prompt), s, image, score in zip(chunk, seeds, result.images, result.scores):
                row = {"class": c, "index": i, "prompt": prompt, "score": score, "seed": s}
                if min_score is not None and score < min_score:
                    drop.write(json.dumps(row) + "\n")
                    drop.flush()
                    dropped += 1
                    continue
                name = f"{folders[c]}/{i:06d}.png"
                atomic_write(out / name, lambda fh, image=image: image.save(fh, format="PNG"))
                man.write(json.dumps({"file": name, **row}) + "\n")
                man.flush()
                kept += 1
            bar.update(len(chunk))
    bar.close()
    rows = _read_jsonl(manifest)
    per = {c: sum(r.get("class") == c for r in rows) for c in classes}
    return {
        "out": str(out),
        "scorer": "clip" if pipe.clip is not None else "self",
        "made": len(todo),
        "kept": kept,
        "dropped": dropped,
        "skipped_existing": len(classes) * per_class - len(todo),
        "images_per_class": per,
    }
