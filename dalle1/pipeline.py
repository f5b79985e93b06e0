"""Text-to-image in one call: ``DALLEPipeline.from_pretrained(folder)(prompt).images``.

The pipeline glues the three trained parts together: the BPE tokenizer turns
the prompt into text tokens, the transformer samples image codes, the VAE
decodes them into pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .checkpoint import load_parts
from .config import Config
from .data import tensor_to_pil
from .sampling import sample_codes
from .text import TextTokenizer
from .transformer import DALLE
from .vae import DiscreteVAE


@dataclass
class DALLEOutput:
    images: list[Image.Image]
    codes: torch.Tensor  # (num_prompts * num_images, grid²)
    prompts: list[str]  # the prompt of each image
    seeds: list[int]  # the seed of each image: re-running with it gives the same image
    scores: list[float] | None = field(default=None)


class DALLEPipeline:
    def __init__(self, config: Config, vae: DiscreteVAE, dalle: DALLE, tokenizer: TextTokenizer):
        self.config, self.vae, self.dalle, self.tokenizer = (
            config,
            vae.eval(),
            dalle.eval(),
            tokenizer,
        )

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device = "cpu"
    ) -> DALLEPipeline:
        """Load a model folder written by ``train.py`` (weights via safetensors only)."""
        config, vae, dalle, tokenizer = load_parts(folder)
        return cls(config, vae, dalle, tokenizer).to(device)

    def to(self, device: str | torch.device) -> DALLEPipeline:
        self.vae.to(device)
        self.dalle.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.dalle.parameters()).device

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        for p in prompts:
            if not isinstance(p, str) or self.tokenizer.num_tokens(p) == 0:
                raise ValueError(f"prompt {p!r} tokenizes to nothing; give a non-empty caption")
        return self.tokenizer.encode(prompts).to(self.device)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_images: int = 1,
        seed: int = 0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cond_scale: float = 1.0,
        progress: bool = False,
    ) -> DALLEOutput:
        """Sample ``num_images`` images per prompt. Image i of the call uses seed ``seed + i``."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if not prompts:
            raise ValueError("no prompt given")
        rows = [p for p in prompts for _ in range(num_images)]
        text = self.encode_prompts(rows)
        seeds = [seed + i for i in range(len(rows))]
        gens = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        codes = sample_codes(
            self.dalle,
            text,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            cond_scale=cond_scale,
            null_text=self.tokenizer.pad_row().to(self.device),
            generators=gens,
            progress=progress,
        )
        images = self.vae.decode(codes)
        return DALLEOutput([tensor_to_pil(im) for im in images], codes, rows, seeds)
