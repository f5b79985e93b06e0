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

from .checkpoint import check_clip_fits, load_clip, load_parts
from .clip import CLIPScorer
from .config import Config
from .images import tensor_to_pil
from .rerank import candidate_scores, rank
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
    def __init__(
        self,
        config: Config,
        vae: DiscreteVAE,
        dalle: DALLE,
        tokenizer: TextTokenizer,
        clip: CLIPScorer | None = None,
    ):
        self.config, self.vae, self.dalle, self.tokenizer = (
            config,
            vae.eval(),
            dalle.eval(),
            tokenizer,
        )
        self.clip = clip.eval() if clip is not None else None  # optional reranker (clip/)
        if clip is not None:
            check_clip_fits(clip, tokenizer)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device = "cpu"
    ) -> DALLEPipeline:
        """Load a model folder written by ``train.py`` (weights via safetensors only)."""
        config, vae, dalle, tokenizer = load_parts(folder)
        clip = load_clip(folder) if (Path(folder) / "clip").is_dir() else None
        pipe = cls(config, vae, dalle, tokenizer, clip=clip).to(device)
        pipe.folder = Path(folder)
        return pipe

    def to(self, device: str | torch.device) -> DALLEPipeline:
        self.vae.to(device)
        self.dalle.to(device)
        if self.clip is not None:
            self.clip.to(device)
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
        image: Image.Image | str | Path | None = None,
        mask_image: Image.Image | str | Path | None = None,
        box: tuple[float, float, float, float] | None = None,
        candidates: int | None = None,
        composite: bool = True,
        feather: int = 0,
        rerank: bool = False,
        keep: int | None = None,
        seeds: list[int] | None = None,
        score: bool = False,
    ) -> DALLEOutput:
        """Sample ``num_images`` images per prompt. Image i of the call uses seed ``seed + i``.

        Reranking (paper section 2.6 reranks samples with CLIP): ``rerank=True`` orders each
        prompt's images best first by the clip scorer (cosine of image and caption) or,
        without clip/ in the folder, by the transformer's mean log-likelihood of the codes
        given the caption, and sets ``scores``; ``keep=K`` then returns only the best K of
        the ``num_images``. ``seeds`` gives one seed per image (overrides ``seed``);
        ``score=True`` fills ``scores`` without reordering.

        Editing: with ``image`` and a ``box`` (pixels, x0, y0, x1, y1) or a
        ``mask_image`` (white = repaint), repaint that region instead; see
        :meth:`edit` (``candidates`` defaults to ``num_images``).
        """
        if image is not None or box is not None or mask_image is not None:
            if image is None:
                raise ValueError("box= / mask_image= need image= (the image to edit)")
            if box is None and mask_image is None:
                raise ValueError(
                    "editing needs box= or mask_image=; for completion or variations use "
                    "pipe.complete(...) / pipe.variations(...)"
                )
            return self.edit(
                image,
                prompt,
                box=box,
                mask_image=mask_image,
                candidates=candidates or num_images,
                seed=seed,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                cond_scale=cond_scale,
                composite=composite,
                feather=feather,
                progress=progress,
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if not prompts:
            raise ValueError("no prompt given")
        if keep is not None and not rerank:
            raise ValueError("keep needs rerank=True")
        rows = [p for p in prompts for _ in range(num_images)]
        text = self.encode_prompts(rows)
        if seeds is None:
            seeds = [seed + i for i in range(len(rows))]
        elif len(seeds) != len(rows):
            raise ValueError(f"got {len(seeds)} seeds for {len(rows)} images")
        seeds = [int(s) for s in seeds]
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
        scores = None
        if rerank or score:
            scores = candidate_scores(images, text, codes, self.dalle, self.clip)
        if rerank:
            order = rank(scores, num_images, keep).to(codes.device)
            images, codes, scores = images[order], codes[order], scores[order.cpu()]
            rows, seeds = [rows[i] for i in order], [seeds[i] for i in order]
        return DALLEOutput(
            [tensor_to_pil(im) for im in images],
            codes,
            rows,
            seeds,
            None if scores is None else [float(s) for s in scores.cpu()],
        )

    # --- editing (see dalle1/editing.py) ------------------------------------------------

    def edit(
        self,
        image: Image.Image | str | Path,
        prompt: str | list[str] | None,
        *,
        box: tuple[float, float, float, float] | None = None,
        mask_image: Image.Image | str | Path | None = None,
        candidates: int = 4,
        seed: int = 0,
        composite: bool = True,
        feather: int = 0,
        **kwargs,
    ) -> DALLEOutput:
        """Repaint a box or mask of ``image`` for ``prompt``; candidates best first.

        Returns an :class:`dalle1.editing.EditOutput` (also ``original``,
        ``mask``, ``repaint``, ``scores``); see :func:`dalle1.editing.edit_image`.
        Sampling options (temperature, top_k, top_p, cond_scale, progress)
        pass through ``kwargs``.
        """
        from .editing import edit_image

        return edit_image(
            self,
            image,
            prompt,
            box=box,
            mask_image=mask_image,
            candidates=candidates,
            seed=seed,
            composite_input=composite,
            feather=feather,
            **kwargs,
        )

    def complete(
        self,
        image: Image.Image | str | Path,
        prompt: str | list[str] | None,
        *,
        rows: int | None = None,
        start: int | None = None,
        candidates: int = 4,
        seed: int = 0,
        composite: bool = True,
        **kwargs,
    ) -> DALLEOutput:
        """Image completion: keep the top ``rows`` code rows (paper: 15 of 32) and sample the rest."""
        from .editing import complete_image

        return complete_image(
            self,
            image,
            prompt,
            rows=rows,
            start=start,
            candidates=candidates,
            seed=seed,
            composite_input=composite,
            **kwargs,
        )

    def variations(
        self,
        image: Image.Image | str | Path,
        prompt: str | list[str] | None = None,
        *,
        fraction: float = 0.5,
        mode: str = "random",
        mask_seed: int = 0,
        candidates: int = 4,
        seed: int = 0,
        composite: bool = True,
        **kwargs,
    ) -> DALLEOutput:
        """Re-sample a seeded random ``fraction`` of the codes (mode "random") or the lower part ("lower")."""
        from .editing import vary_image

        return vary_image(
            self,
            image,
            prompt,
            fraction=fraction,
            mode=mode,
            mask_seed=mask_seed,
            candidates=candidates,
            seed=seed,
            composite_input=composite,
            **kwargs,
        )
