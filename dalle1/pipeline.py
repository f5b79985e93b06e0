"""Text-to-image in one call: ``DALLEPipeline.from_pretrained(folder)(prompt).images``.

The pipeline glues the three trained parts together: the BPE tokenizer turns
the prompt into text tokens, the transformer samples image codes, the VAE
decodes them into pixels, and an optional scorer reranks the candidates. The
same object edits images: :meth:`DALLEPipeline.edit` (a box or a mask),
:meth:`~DALLEPipeline.complete` (from the top rows) and
:meth:`~DALLEPipeline.variations`; the region, ranking and compositing rules are
:mod:`dalle1.editing`'s.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .checkpoint import check_clip_fits, load_clip, load_parts
from .clip import CLIPScorer
from .config import Config
from .editing import (
    Box,
    EditWarning,
    MaskInput,
    blend_weights,
    cells_to_pixels,
    completion_cells,
    edit_warnings,
    region_cells,
    sample_edits,
    variation_cells,
)
from .editing import composite as paste_back
from .images import ImageInput, load_input, pil_to_tensor, tensor_to_pil, to_uint8
from .recommend import Recommended, load_recommended
from .rerank import candidate_scores, count_distinct, rank
from .sampling import SamplingOptions, sample_codes
from .text import TextTokenizer
from .transformer import DALLE
from .vae import DiscreteVAE

#: the most images one call samples (prompts x num_images, or candidates of an edit): the
#: codes, the key/value cache and the decoded pixels of all of them are held at once
MAX_IMAGES_PER_CALL = 1024


def check_count(name: str, value: int, total: int | None = None) -> None:
    """One-line ValueError unless 1 <= value and the call's total stays within the bound."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    total = value if total is None else total
    if total > MAX_IMAGES_PER_CALL:
        raise ValueError(
            f"{name}={value} asks for {total} images in one call; at most "
            f"{MAX_IMAGES_PER_CALL} (sample in several calls, or use `dalle1 synth`)"
        )


class _Recommended:
    """The default of every sampling argument: "the model folder's recommended value"."""

    def __repr__(self) -> str:
        return "RECOMMENDED"


#: leave a sampling argument at this to take the model folder's ``sampling.json`` value
RECOMMENDED: Any = _Recommended()


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when torch sees a GPU, else the CPU; anything else as torch reads it."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TruncatedPromptWarning(UserWarning):
    """A prompt takes more BPE tokens than the model's text positions; the rest is cut."""


@dataclass
class DALLEOutput:
    images: list[Image.Image]
    codes: torch.Tensor  # (num_prompts * num_images, grid²)
    prompts: list[str]  # the prompt of each image
    seeds: list[int]  # the seed of each image: re-running with it gives the same image
    scores: list[float] | None = field(default=None)
    pixels: torch.Tensor | None = None  # (B, 3, H, W) in [0, 1]: exactly the values of `images`
    options: SamplingOptions | None = None  # the options every image was sampled with
    candidates: int = 1  # images sampled per image returned (reranking); 1 = none


@dataclass
class EditOutput(DALLEOutput):
    """A :class:`DALLEOutput` (candidates best first, ``scores`` set) plus what was edited."""

    original: Image.Image | None = None  # the input fitted to the model's square
    mask: Image.Image | None = None  # white = repainted cells
    repaint: torch.Tensor | None = None  # bool (grid²,)
    original_codes: torch.Tensor | None = None  # (grid²,)
    generated: list[Image.Image] = field(default_factory=list)  # decoded, before compositing
    warnings: list[str] = field(default_factory=list)  # what may make the edit disappoint


def _pictures(images: torch.Tensor) -> tuple[list[Image.Image], torch.Tensor]:
    """Decoded images (B, 3, H, W) -> (PIL images, their 8-bit values as floats in [0, 1]).

    The values are made contiguous: the decoder's convolutions may hand back a
    channels-last layout, which would make a scorer's convolutions take another path.
    """
    return [tensor_to_pil(im) for im in images], (to_uint8(images).float() / 255).contiguous()


class DALLEPipeline:
    def __init__(
        self,
        config: Config,
        vae: DiscreteVAE,
        dalle: DALLE,
        tokenizer: TextTokenizer,
        clip: CLIPScorer | None = None,
        folder: str | Path | None = None,
        recommended: Recommended | None = None,
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
        self.folder = None if folder is None else Path(folder)  # the model folder, if loaded
        # how to sample unless told otherwise: the folder's sampling.json (dalle1/recommend.py)
        self.recommended = recommended or Recommended(note="no recommended settings: plain")

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        cache_dtype: str | torch.dtype | None = None,
    ) -> DALLEPipeline:
        """Load a model folder written by ``train.py`` (weights via safetensors only).

        ``dtype`` (e.g. ``torch.bfloat16``) casts the transformer's weights once, so that
        sampling runs in that dtype (see :meth:`to`). None: bfloat16 on a CUDA device that
        supports it (half the bytes per decoded token), float32 elsewhere.
        ``cache_dtype`` (e.g. ``"bfloat16"``) keeps the sampling key/value cache in that
        dtype while the weights keep theirs (faster at large grids and batches on a GPU or
        a CPU with AMX, :func:`dalle1.decoding.attention_dtype`; opt-in, see
        :func:`dalle1.decoding.cache_dtype`). None: ``$DALLE1_CACHE_DTYPE``, else the weights'.
        ``device="auto"`` picks CUDA when available. The folder's ``sampling.json`` (the
        settings training chose, :mod:`dalle1.recommend`) becomes :attr:`recommended`.
        """
        config, vae, dalle, tokenizer = load_parts(folder)
        clip = load_clip(folder) if (Path(folder) / "clip").is_dir() else None
        recommended = load_recommended(folder)
        device = resolve_device(device)
        if dtype is None:
            cuda = torch.device(device).type == "cuda"
            dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
        dalle.cache_dtype = cache_dtype
        pipe = cls(config, vae, dalle, tokenizer, clip=clip, folder=folder, recommended=recommended)
        return pipe.to(device, dtype)

    def to(
        self,
        device: str | torch.device | torch.dtype | None = None,
        dtype: torch.dtype | None = None,
    ) -> DALLEPipeline:
        """Move every part to ``device``; cast the transformer's weights to ``dtype``.

        Only the transformer is cast: it runs once per image *token*, so its weights are what
        sampling reads over and over (bf16 halves those bytes); the VAE and the scorer run
        once per image and stay float32. ``pipe.to(torch.bfloat16)`` is a cast alone.
        """
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if device is not None:
            self.vae.to(device)
            self.dalle.to(device)
            if self.clip is not None:
                self.clip.to(device)
        if dtype is not None:
            self.dalle.to(dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.dalle.parameters()).device

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> text ids (B, text_len); a prompt longer than the text positions warns
        (:class:`TruncatedPromptWarning`) once per distinct prompt."""
        limit = self.tokenizer.text_len
        for p in dict.fromkeys(prompts):
            n = self.tokenizer.num_tokens(p) if isinstance(p, str) else 0
            if n == 0:
                raise ValueError(f"prompt {p!r} tokenizes to nothing; give a non-empty caption")
            if n > limit:
                kept = self.tokenizer.decode(self.tokenizer.encode(p))[0]
                warnings.warn(
                    f"prompt {p!r} takes {n} text tokens but the model reads {limit}; "
                    f"it sees only {kept!r}",
                    TruncatedPromptWarning,
                    stacklevel=3,
                )
        return self.tokenizer.encode(prompts).to(self.device)

    def sampling_options(
        self, options: SamplingOptions | None = None, **given: Any
    ) -> SamplingOptions:
        """``options`` (default: the recommended ones) with every argument in ``given`` that
        is not :data:`RECOMMENDED` put in its place."""
        base = options if options is not None else self.recommended.options
        return replace(base, **{k: v for k, v in given.items() if v is not RECOMMENDED})

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_images: int = 1,
        seed: int = 0,
        temperature: float = RECOMMENDED,
        top_k: int | None = RECOMMENDED,
        top_p: float | None = RECOMMENDED,
        cond_scale: float = RECOMMENDED,
        guidance_top_p: float | None = RECOMMENDED,
        progress: bool = False,
        image: ImageInput | None = None,
        mask_image: MaskInput | None = None,
        box: Box | None = None,
        candidates: int | None = None,
        composite: bool = True,
        feather: int = 0,
        rerank: bool | None = None,
        keep: int | None = None,
        seeds: list[int] | None = None,
        score: bool = False,
        options: SamplingOptions | None = None,
    ) -> DALLEOutput:
        """Sample ``num_images`` images per prompt. Image i of the call uses seed ``seed + i``.

        Sampling options: see :class:`dalle1.sampling.SamplingOptions`. Every one left out
        takes the model folder's recommended value (:attr:`recommended`, from
        ``sampling.json``); ``options=`` replaces that base, and ``top_k=None`` /
        ``top_p=None`` / ``cond_scale=1`` turn a filter or guidance off.

        Reranking (paper section 2.6 reranks samples with CLIP): by default, when the folder
        recommends ``candidates`` > 1, ``num_images × candidates`` images are sampled per
        prompt and the best ``num_images`` returned. ``rerank=True`` orders the
        ``num_images`` of each prompt best first instead, and ``keep=K`` then returns only
        the best K (``keep`` alone implies ``rerank=True``); ``rerank=False`` never reranks. The order is the clip scorer's (cosine
        of image and caption) or, without clip/ in the folder, the transformer's mean
        log-likelihood of the codes given the caption; a candidate whose codes repeat a
        better one's comes after every distinct one. ``seeds`` gives one seed per image
        (overrides ``seed``, no default reranking); ``score=True`` fills ``scores``
        without reordering.

        Editing: with ``image`` and a ``box`` (pixels, x0, y0, x1, y1) or a
        ``mask_image`` (white = repaint), repaint that region instead; see
        :meth:`edit` (``candidates`` defaults to ``num_images``).
        """
        options = self.sampling_options(
            options,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            cond_scale=cond_scale,
            guidance_top_p=guidance_top_p,
        )
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
                composite=composite,
                feather=feather,
                progress=progress,
                options=options,
            )
        # 1. check the inputs
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if not prompts:
            raise ValueError("no prompt given")
        options.check()
        if keep is not None and rerank is False:
            raise ValueError("keep needs rerank=True (or rerank left out)")
        if keep is not None:
            rerank = True
        if keep is not None and not 1 <= keep <= num_images:  # before any sampling
            raise ValueError(f"keep must lie in [1, num_images={num_images}], got {keep}")
        # the folder's recommended reranking: num_images x candidates, the best num_images kept
        pool = 1
        if rerank is None and keep is None and seeds is None:
            pool = self.recommended.candidates
            if pool > 1:
                rerank, keep, num_images = True, num_images, num_images * pool
        check_count("num_images", num_images, num_images * len(prompts))
        # 2. encode the prompts: one row per image
        rows = [p for p in prompts for _ in range(num_images)]
        text = self.encode_prompts(rows)
        # 3. one seed, and one generator, per image
        if seeds is None:
            seeds = [seed + i for i in range(len(rows))]
        elif len(seeds) != len(rows):
            raise ValueError(f"got {len(seeds)} seeds for {len(rows)} images")
        seeds = [int(s) for s in seeds]
        gens = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        # 4. sample the codes
        codes = sample_codes(
            self.dalle,
            text,
            **asdict(options),
            null_text=self.tokenizer.pad_row().to(self.device),
            generators=gens,
            progress=progress,
        )
        # 5. decode them
        images = self.vae.decode(codes)
        # 6. score and rerank (repeated codes after every distinct candidate)
        scores = None
        if rerank or score:
            scores = candidate_scores(images, text, codes, self.dalle, self.clip)
        if rerank:
            order = rank(scores, num_images, keep, codes=codes).to(codes.device)
            self._warn_repeats(codes, prompts, num_images, keep or num_images)
            images, codes, scores = images[order], codes[order], scores[order.cpu()]
            rows, seeds = [rows[i] for i in order], [seeds[i] for i in order]
        # 7. the output
        pictures, pixels = _pictures(images)
        return DALLEOutput(
            pictures,
            codes,
            rows,
            seeds,
            None if scores is None else [float(s) for s in scores.cpu()],
            pixels,
            options,
            pool,
        )

    @staticmethod
    def _warn_repeats(codes: torch.Tensor, prompts: list[str], group: int, keep: int) -> None:
        """Warn when a prompt's candidates hold fewer distinct images than are kept."""
        for p, chunk in zip(prompts, codes.split(group)):
            distinct = count_distinct(chunk)
            if distinct < keep:
                warnings.warn(
                    f"only {distinct} distinct images among the {group} candidates for {p!r}; "
                    f"{keep - distinct} of the best {keep} repeat one (sample more candidates, "
                    "raise the temperature or loosen top-k / top-p)",
                    stacklevel=3,
                )

    # --- editing (the rules are dalle1/editing.py's) -------------------------------------

    def _caption_row(self, prompt: str | list[str] | None) -> tuple[torch.Tensor, str]:
        """The one caption of an edit as ids (L,); None or "" is the empty caption (all pads)."""
        if isinstance(prompt, list | tuple):
            if len(prompt) != 1:
                raise ValueError(f"editing takes one prompt, got {len(prompt)}")
            prompt = prompt[0]
        if prompt is None or prompt.strip() == "":
            return self.tokenizer.pad_row().to(self.device), ""
        return self.encode_prompts([prompt])[0], prompt

    @torch.no_grad()
    def edit(
        self,
        image: ImageInput,
        prompt: str | list[str] | None,
        *,
        box: Box | None = None,
        mask_image: MaskInput | None = None,
        repaint: torch.Tensor | None = None,
        candidates: int = 4,
        seed: int = 0,
        temperature: float = RECOMMENDED,
        top_k: int | None = RECOMMENDED,
        top_p: float | None = RECOMMENDED,
        cond_scale: float = RECOMMENDED,
        guidance_top_p: float | None = RECOMMENDED,
        composite: bool = True,
        feather: int = 0,
        batch_size: int | None = None,
        progress: bool = False,
        options: SamplingOptions | None = None,
    ) -> EditOutput:
        """Repaint part of ``image`` for ``prompt`` (None or "" = the empty caption).

        The region is a pixel ``box``, a ``mask_image`` (white = repaint) or ``repaint``
        cells (bool (grid²,)); exactly one. ``candidates`` samples (candidate i uses seed
        ``seed + i``) are returned best first; see :func:`dalle1.editing.sample_edits` for
        the ranking and its reason. ``composite`` pastes the input's own pixels back
        outside the repainted cells (``feather`` px of soft blend inside them).

        Sampling options left out take the folder's recommended values, guidance included
        (the empty caption's rows see the same kept codes). ``warnings`` of the output (also
        issued as Python warnings) say when the candidates are (nearly) all the same, or
        when the region leaves most of the picture's object outside it.
        """
        options = self.sampling_options(
            options,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            cond_scale=cond_scale,
            guidance_top_p=guidance_top_p,
        )
        given = sum(x is not None for x in (box, mask_image, repaint))
        if given != 1:
            raise ValueError("give exactly one of box=, mask_image= or repaint=")
        check_count("candidates", candidates)
        options.check()
        if feather < 0:
            raise ValueError(f"feather must be >= 0 pixels, got {feather}")
        size, grid = self.vae.cfg.image_size, self.vae.grid_size
        img = load_input(image)
        if repaint is None:
            repaint = region_cells(img, size, grid, box=box, mask_image=mask_image)
        repaint = repaint.bool().flatten().cpu()
        if repaint.shape != (grid * grid,) or not repaint.any():
            raise ValueError(f"repaint must select at least one of {grid * grid} cells")
        text, caption = self._caption_row(prompt)
        fitted = pil_to_tensor(img, size).to(self.device)
        original_codes = self.vae.encode(fitted[None])[0]
        edits = sample_edits(
            self.dalle,
            text,
            original_codes,
            repaint,
            options=options,
            candidates=candidates,
            seed=seed,
            null_text=self.tokenizer.pad_row().to(self.device),
            batch_size=batch_size,
            progress=progress,
        )
        generated = self.vae.decode(edits.codes)
        pixels = cells_to_pixels(repaint, grid, size)
        if composite:
            weights = blend_weights(pixels, feather).to(self.device)
            results = torch.stack([paste_back(fitted, g, weights) for g in generated])
        else:
            results = generated
        pictures, values = _pictures(results)
        notes = edit_warnings(fitted, pixels, edits.codes, original_codes, repaint)
        for note in notes:
            warnings.warn(note, EditWarning, stacklevel=3)
        return EditOutput(
            images=pictures,
            codes=edits.codes,
            prompts=[caption] * candidates,
            seeds=edits.seeds,
            scores=edits.scores.tolist(),
            pixels=values,
            original=tensor_to_pil(fitted),
            mask=tensor_to_pil(pixels.float()[None].expand(3, -1, -1)),
            repaint=repaint,
            original_codes=original_codes,
            generated=[tensor_to_pil(g) for g in generated],
            options=options,
            warnings=notes,
        )

    def complete(
        self,
        image: ImageInput,
        prompt: str | list[str] | None,
        *,
        rows: int | None = None,
        start: int | None = None,
        **kwargs,
    ) -> EditOutput:
        """Image completion: keep the top ``rows`` code rows (or the codes before raster
        position ``start``) and sample the rest.

        Default: the paper's 15 of 32 rows (section 3.3), scaled to the grid. Other keyword
        arguments are those of :meth:`edit`.
        """
        repaint = completion_cells(self.vae.grid_size, rows=rows, start=start)
        return self.edit(image, prompt, repaint=repaint, **kwargs)

    def variations(
        self,
        image: ImageInput,
        prompt: str | list[str] | None = None,
        *,
        fraction: float = 0.5,
        mode: str = "random",
        mask_seed: int = 0,
        cells: torch.Tensor | None = None,
        **kwargs,
    ) -> EditOutput:
        """Re-sample a seeded random ``fraction`` of the codes (mode "random") or the lower
        part ("lower"); ``cells`` (bool (grid²,)) chooses the codes directly instead.

        ``prompt`` None or "" conditions on the empty caption (all per-position pads,
        paper section 2.2). Other keyword arguments are those of :meth:`edit`.
        """
        if cells is None:
            cells = variation_cells(self.vae.grid_size, fraction, mode, mask_seed)
        return self.edit(image, prompt, repaint=cells, **kwargs)
