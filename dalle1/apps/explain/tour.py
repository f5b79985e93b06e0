"""``explain(model_folder, out_dir)``: every picture of the tour, for one model folder.

What it reads besides the model's weights, and where it looks first:

* example images (reconstructions, codes, codebook use, the edit): the ``--images``
  given, else the model folder's own ``examples/`` (images with same-stem captions),
  else the held-out part of the training data named in ``config.json``
  (``data.path``, split as training split it);
* the loss history: the model folder's ``history/`` (``dalle.csv``, ``vae.csv`` and the
  runs' held-out ``dalle.json``, ``vae.json``: training copies them there), else
  ``logs/metrics.csv`` (and the run's ``metrics.json``) inside the model folder (or its
  ``vae/`` part), else beside the folder where ``train.py`` writes them
  (``train.out_dir/logs``; older folders).

A picture whose inputs are missing is skipped with the reason (``Explained.skipped``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ...data import find_pairs, split_pairs
from ...data.captions import read_captions
from ...images import load_image
from ...masks import KINDS, layer_kinds
from ...pipeline import DALLEPipeline
from ...sampling import SamplingOptions
from .attention import (
    Panel,
    fields_picture,
    figure11_picture,
    kind_picture,
    layer_picture,
    model_stream,
    schedule_picture,
)
from .curves import (
    dalle_held_out_line,
    loss_curves_picture,
    read_held_out,
    read_metrics,
    vae_held_out_line,
)
from .figures import save
from .generation import (
    edit_picture,
    guidance_sweep,
    raster_frames,
    rerank_picture,
    sampling_sweep,
    save_gif,
)
from .stream import stream_layout
from .tokens import codebook_picture, codebook_usage_picture, codes_picture, reconstructions_picture


@dataclass
class Explained:
    """What :func:`explain` wrote (name -> file), skipped (name -> reason), and where the
    cells of the mask pictures lie (name -> panels; the tests read them back)."""

    files: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    panels: dict[str, list[Panel]] = field(default_factory=dict)
    boxes: dict[str, list] = field(default_factory=dict)  # name -> Mosaic.boxes
    codebook_order: torch.Tensor | None = None  # the code ids of codebook.png's tiles, in order


@dataclass
class Examples:
    images: torch.Tensor | None  # (B, 3, H, W) in [0, 1]
    captions: list[str]
    source: str  # where they came from, or why there are none


def find_examples(
    pipe: DALLEPipeline, folder: Path, images: list[str | Path] | None, count: int
) -> Examples:
    """The given image files, else the folder's ``examples/``, else held-out training data."""
    size = pipe.vae.cfg.image_size
    if images:
        paths = [Path(p) for p in images]
        for p in paths:
            if not p.exists():
                raise FileNotFoundError(f"image '{p}' does not exist")
        return Examples(torch.stack([load_image(p, size) for p in paths]), [], "--images")
    if (folder / "examples").is_dir() and find_pairs(folder / "examples"):
        pairs, source = find_pairs(folder / "examples"), f"{folder.name}/examples"
    else:
        data = pipe.config.data
        try:
            pairs = find_pairs(data.path)
        except (FileNotFoundError, TypeError) as err:
            return Examples(None, [], f"{err} (give images with --images)")
        train, held = split_pairs(pairs, data.val_fraction, data.seed)
        pairs, source = (held, "held-out images") if held else (train, "training images")
        source += f" of {data.path}"
    if not pairs:
        return Examples(None, [], "no example images found (give images with --images)")
    pairs = pairs[:count]
    captions = [(read_captions(cap) or [""])[0] for _, cap in pairs]
    return Examples(torch.stack([load_image(p, size) for p, _ in pairs]), captions, source)


def training_log(folder: Path, part: str | None, fallback: Path | None) -> Path | None:
    """The training log of a part: the folder's ``history/`` first (``vae.csv``, or
    ``dalle.csv`` for the transformer), then ``metrics.csv`` inside the folder, then beside it."""
    inside = folder / part if part else folder
    kept = folder / "history" / f"{part or 'dalle'}.csv"
    for candidate in (kept, inside / "logs" / "metrics.csv", inside / "metrics.csv"):
        if candidate.is_file():
            return candidate
    if fallback is not None and (fallback / "logs" / "metrics.csv").is_file():
        return fallback / "logs" / "metrics.csv"
    return None


def held_out_file(log: Path) -> Path | None:
    """The run's held-out figures: ``history/<stage>.json`` beside ``history/<stage>.csv``,
    ``metrics.json`` beside ``logs/`` (train.out_dir) or ``held_out.json`` beside the log."""
    kept = log.with_suffix(".json") if log.parent.name == "history" else None
    for candidate in (kept, log.parent.parent / "metrics.json", log.parent / "held_out.json"):
        if candidate is None:
            continue
        if candidate.is_file():
            return candidate
    return None


@torch.no_grad()
def explain(
    model: str | Path,
    out: str | Path,
    prompt: str | None = None,
    seed: int = 0,
    images: list[str | Path] | None = None,
    num_recon: int = 8,
    num_usage: int = 512,
    all_kinds: bool = True,
    progress: bool = True,
    edit_prompt: str | None = None,
    edit_box: tuple[int, int, int, int] | None = None,
    edit_image: str | Path | None = None,
    options: SamplingOptions | None = None,
    sweep_images: int = 8,
    candidates: int = 32,
    keep: int = 4,
    device: str = "cpu",
) -> Explained:
    """Draw every picture of the tour for the model folder ``model`` into ``out``.

    prompt:      caption for the stream layout, the animation, the sweeps and the
                 reranking (default: the first example's caption, else "a picture").
    images:      image files for the reconstructions, codes and edit (default: see the
                 module docstring).
    num_usage:   how many example images are encoded for the codebook pictures.
    all_kinds:   also draw every mask kind, not just the layers of the model.
    edit_prompt: caption of the edit (default: ``prompt``); ``edit_box`` its pixel box
                 (default: the middle half) on ``edit_image`` (default: the first example).
    options:     sampling settings of the animation, the sweeps (each sweep varies its
                 own knob), the reranking and the edit (default: the folder's
                 recommended ones, ``sampling.json``).
    sweep_images, candidates, keep: images per sweep row; reranked candidates and how
                 many are kept.
    """
    folder, out = Path(model), Path(out)
    pipe = DALLEPipeline.from_pretrained(folder, device=device)
    cfg, vae, dalle, tokenizer = pipe.config, pipe.vae, pipe.dalle, pipe.tokenizer
    options = options if options is not None else pipe.recommended.options
    out.mkdir(parents=True, exist_ok=True)
    result = Explained()
    examples = find_examples(pipe, folder, images, max(num_recon, num_usage))
    prompt = prompt or (examples.captions[0] if examples.captions else "a picture")
    bar = tqdm(total=8, desc="explain", disable=not progress)

    def keep_picture(name: str, img: Image.Image) -> None:
        result.files[name] = save(img, out / name)

    # 1. the token stream (section 2.2)
    keep_picture("stream_layout.png", stream_layout(tokenizer, dalle.shape, prompt))
    bar.update()

    # 2. the attention masks (appendix B.1)
    stream = model_stream(dalle.shape, dalle.cfg.conv_kernel)
    depth, attention = dalle.cfg.depth, dalle.cfg.attention
    pictures = {"mask_figure11.png": figure11_picture()}
    for i, kind in enumerate(layer_kinds(depth, attention)):
        pictures[f"mask_layer{i + 1:02d}_{kind}.png"] = layer_picture(i, depth, attention, stream)
    if all_kinds:
        for kind in KINDS:
            pictures[f"mask_kind_{kind}.png"] = kind_picture(kind, stream)
    pictures["mask_schedule.png"] = schedule_picture(depth, attention, stream)
    pictures["mask_fields.png"] = fields_picture(stream)
    for name, picture in pictures.items():
        keep_picture(name, picture.image)
        result.panels[name] = picture.panels
    bar.update()

    # 3. raster-order sampling (sections 2.2, 2.6)
    sample = pipe(prompt, num_images=1, seed=seed, **asdict(options))
    gif = out / "raster_order.gif"
    heading = f'raster-order sampling of "{prompt}" (seed {seed})'
    result.files["raster_order.gif"] = save_gif(
        raster_frames(vae, sample.codes[0], caption=prompt), gif, title=heading
    )
    sample.images[0].save(out / "sample.png")
    result.files["sample.png"] = out / "sample.png"
    bar.update()

    # 4. the sampling knobs and reranking (section 2.6)
    for name, picture in (
        (
            "guidance_sweep.png",
            guidance_sweep(pipe, prompt, seed, num_images=sweep_images, options=options),
        ),
        (
            "sampling_sweep.png",
            sampling_sweep(pipe, prompt, seed, num_images=sweep_images, options=options),
        ),
        ("rerank.png", rerank_picture(pipe, prompt, seed, candidates, keep, options)),
    ):
        keep_picture(name, picture.image)
        result.boxes[name] = picture.boxes
    bar.update()

    # 5. the image tokenizer (section 2.1) and 6. editing (section 3.3): need example images
    needs_examples = (
        "vae_reconstructions.png",
        "codebook.png",
        "codes.png",
        "codebook_usage.png",
        "edit.png",
    )
    if examples.images is None:
        for name in needs_examples:
            result.skipped[name] = examples.source
        bar.update(2)
    else:
        data = examples.images
        recon = reconstructions_picture(vae, data[:num_recon])
        keep_picture("vae_reconstructions.png", recon.image)
        result.boxes["vae_reconstructions.png"] = recon.boxes
        codes = torch.cat([vae.encode(c.to(pipe.device)).cpu() for c in data[:num_usage].split(64)])
        used = min(len(data), num_usage)
        book, order = codebook_picture(vae, codes, used)
        keep_picture("codebook.png", book.image)
        result.boxes["codebook.png"] = book.boxes
        result.codebook_order = order
        first = examples.captions[0] if examples.captions else ""
        keep_picture("codes.png", codes_picture(vae, data[0], first))
        keep_picture("codebook_usage.png", codebook_usage_picture(codes, vae.codebook_size, used))
        bar.update()
        target = data[0] if edit_image is None else load_image(edit_image, vae.cfg.image_size)
        edit = edit_picture(
            pipe, target, edit_prompt or prompt, edit_box, seed, candidates=8, options=options
        )
        keep_picture("edit.png", edit.image)
        result.boxes["edit.png"] = edit.boxes
        bar.update()

    # 7. training curves
    vae_run = Path(cfg.dalle.vae).parent if cfg.dalle.vae else None
    for name, part, fallback, what in (
        ("loss_curves.png", None, folder.parent, "transformer"),
        ("vae_loss_curves.png", "vae", vae_run, "dVAE"),
    ):
        log = training_log(folder, part, fallback)
        if log is None:
            result.skipped[name] = f"no training log in '{folder}' nor beside it"
            continue
        series = read_metrics(log)
        if not series:
            result.skipped[name] = f"no loss column in '{log}'"
            continue
        held = read_held_out(held_out_file(log))
        line = dalle_held_out_line(held) if part is None else vae_held_out_line(held)
        heading = f"{what} training loss"
        if part is None:
            lines = ["loss = 1/8 · text cross-entropy + 7/8 · image cross-entropy (paper §2.2)"]
        else:
            lines = [
                f"dVAE: {cfg.vae.quantizer} quantizer, {cfg.vae.recon_loss} reconstruction loss (paper §2.1)"
            ]
        lines += [line] if line else []
        lines.append(f"from {log.parent.name}/{log.name} of {log.parent.parent.name}")
        if part is None:
            unit = "nats"
        else:
            unit = {"mse": "MSE", "l1": "mean absolute error"}.get(cfg.vae.recon_loss, "nats")
        keep_picture(name, loss_curves_picture(series, heading, lines, held, unit))
    bar.update()
    bar.close()
    return result
