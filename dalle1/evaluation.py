"""Held-out figures of the trained parts: reconstruction, bits per token, retrieval.

- :func:`evaluate_vae` — the image tokenizer: PSNR / MSE of ``decode(encode(x))``
  and how much of the codebook is used (paper section 2.1);
- :func:`evaluate_dalle` — the transformer: cross-entropy of held-out captions
  and codes in bits per text token and per image token (section 2.2);
- :func:`retrieval_accuracy` — the scorer: image -> caption and caption -> image
  top-1 in batches of held-out pairs.

Training writes these to ``out_dir/metrics.json``; ``dalle1 eval`` and
``dalle1 eval-vae`` compute them for a model folder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .clip import CLIPScorer
from .codes import encode_items
from .data import CaptionedFolder
from .text import TextTokenizer
from .transformer import DALLE
from .vae import DiscreteVAE, codebook_usage, psnr


@torch.no_grad()
def evaluate_vae(
    vae: DiscreteVAE, dataset: CaptionedFolder, batch_size: int = 64
) -> dict[str, float]:
    """Held-out reconstruction PSNR / MSE and codebook usage."""
    vae.eval()
    originals, recons, codes = [], [], []
    for images, _ in DataLoader(dataset, batch_size=batch_size):
        c = vae.encode(images)
        originals.append(images)
        recons.append(vae.decode(c))
        codes.append(c)
    x, y = torch.cat(originals), torch.cat(recons)
    return {
        "psnr": psnr(y, x),
        "mse": F.mse_loss(y, x).item(),
        **codebook_usage(torch.cat(codes), vae.codebook_size),
    }


@torch.no_grad()
def evaluate_dalle(
    dalle: DALLE,
    tokenizer: TextTokenizer,
    codes: torch.Tensor,
    captions: list[list[str]],
    batch_size: int = 64,
) -> dict[str, float]:
    """Held-out cross-entropy, in bits per text token and per image token (first caption line)."""
    dalle.eval()
    text_bits = image_bits = 0.0
    for i in range(0, len(codes), batch_size):
        text = tokenizer.encode([(c or [""])[0] for c in captions[i : i + batch_size]])
        _, logs = dalle.loss(text, codes[i : i + batch_size])
        n = len(text)
        text_bits += logs["text_loss"].item() * n / math.log(2)
        image_bits += logs["image_loss"].item() * n / math.log(2)
    return {
        "val_text_bits_per_token": text_bits / len(codes),
        "val_image_bits_per_token": image_bits / len(codes),
    }


@torch.no_grad()
def encode_dataset(
    vae: DiscreteVAE, dataset: CaptionedFolder, batch_size: int = 64, progress: bool = True
) -> torch.Tensor:
    """Run the frozen VAE over every image of a dataset once: -> codes (M, grid²)."""
    items = ((dataset[i][0], []) for i in range(len(dataset)))
    return encode_items(vae, items, batch_size, progress, total=len(dataset))[0]


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
