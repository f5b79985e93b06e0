"""A local web page for a model folder: ``dalle1 ui --model FOLDER`` (needs ``pip install dalle1[ui]``).

Two tabs:

* **Generate** — a prompt gives a grid of images with their scores. Sliders set
  the sampling temperature, top-k / top-p filtering over the image vocabulary,
  the classifier-free guidance scale and the number of candidates: ``candidates``
  images are sampled and the best ``num_images`` are shown (DALL-E 1, section
  2.6, samples many and reranks them with CLIP; without a reranker the score is
  the transformer's own mean log-likelihood per image code). The seed box makes
  every grid reproducible: image ``i`` uses seed ``seed + i``.
* **Edit** — upload an image (or pick one of the model folder's ``examples/``), type
  a box or paint over the region to repaint, and get regenerated candidates. Codes
  whose cell touches the region are resampled, every other code is kept, and the
  candidates are ranked by the log-likelihood of the kept codes after the region
  (see :mod:`dalle1.editing`, paper section 3.3 and appendix G).

Every control starts at the model folder's recommended sampling settings
(``sampling.json``, :mod:`dalle1.recommend`), guidance included. Warnings of the
pipeline (a truncated prompt, repeated candidates, a doubtful edit) show as
notices on the page.

The page runs on 127.0.0.1 with gradio's analytics off and a theme that uses
the system's fonts only, so neither the server nor the browser reaches out to
the network. Uploads are capped at :data:`MAX_UPLOAD_BYTES` (gradio refuses a
bigger file before storing it) and an image to edit at
:data:`dalle1.images.MAX_INPUT_PIXELS` pixels.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageChops

from ..data import find_pairs
from ..editing import parse_box
from ..images import check_pixels
from ..pipeline import DALLEOutput, DALLEPipeline
from ..sampling import SamplingOptions

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

#: the largest upload the page accepts (an image to edit; the model works at a few hundred px)
MAX_UPLOAD_BYTES = 16 * 2**20

LOCAL_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
LOCAL_MONO = ["ui-monospace", "monospace"]


def slider_options(
    temperature: float,
    top_k: float | int | None,
    top_p: float | None,
    cond_scale: float,
    base: SamplingOptions | None = None,
) -> SamplingOptions:
    """Slider values -> the sampler's options: top-k 0 and top-p 0 or 1 mean "off".

    Options without a slider keep their value in ``base`` (the model's recommended ones).
    """
    k = int(top_k) if top_k else None
    p = float(top_p) if top_p and 0 < float(top_p) < 1 else None
    return replace(
        base or SamplingOptions(),
        temperature=float(temperature),
        top_k=k,
        top_p=p,
        cond_scale=float(cond_scale),
    )


#: what an edit's score is: dalle1.editing ranks candidates by how likely the model finds
#: the kept codes after the region given each candidate (nats; 0 when none come after it)
EDIT_SCORE = "log p(kept codes after region)"


def _score_name(pipe: DALLEPipeline) -> str:
    return "CLIP score" if getattr(pipe, "clip", None) is not None else "log p/code"


def _captioned(
    pipe: DALLEPipeline, out: Any, count: int, name: str | None = None
) -> list[tuple[Image.Image, str]]:
    """The first ``count`` images of a best-first output, each captioned with score and seed."""
    name = name or _score_name(pipe)
    scores = out.scores or [float("nan")] * len(out.images)
    return [
        (image, f"{name} {score:.3f} · seed {seed}")
        for image, score, seed in list(zip(out.images, scores, out.seeds))[:count]
    ]


def _best_of(
    pipe: DALLEPipeline,
    call: Callable[[int, int], DALLEOutput],
    num_images: int,
    candidates: int | None,
    name: str | None = None,
) -> list[tuple[Image.Image, str]]:
    """``call(pool, keep)`` samples ``pool = max(candidates, num_images)`` candidates ranked
    best first; the best ``num_images`` come back captioned with score and seed."""
    num_images = int(num_images)
    pool = max(int(candidates or num_images), num_images)
    return _captioned(pipe, call(pool, num_images), num_images, name)


def recommended_controls(pipe: DALLEPipeline, num_images: int = 4) -> dict[str, float | int]:
    """The starting value of every control: the model folder's recommended settings
    (top-k 0 and top-p 1 mean "off"; candidates = images × the recommended pool)."""
    rec = pipe.recommended
    o = rec.options
    return {
        "temperature": o.temperature,
        "top_k": o.top_k or 0,
        "top_p": o.top_p if o.top_p is not None else 1.0,
        "cond_scale": o.cond_scale,
        "candidates": num_images * rec.candidates,
    }


def prompt_placeholder(pipe: DALLEPipeline) -> str:
    """A caption like the training captions: the first of the model folder's examples."""
    for path in example_images(pipe, 1):
        caption = Path(path).with_suffix(".txt")
        if caption.exists() and caption.read_text().strip():
            return caption.read_text().strip().splitlines()[0]
    return "a caption like the training captions"


def generate(
    pipe: DALLEPipeline,
    prompt: str,
    num_images: int = 4,
    seed: int = 0,
    options: SamplingOptions | None = None,
    candidates: int | None = None,
) -> list[tuple[Image.Image, str]]:
    """Sample ``max(candidates, num_images)`` images with ``options``; return the best
    ``num_images``, captioned with score and seed.

    Ranking is the pipeline's (``rerank=True, keep=num_images``): the CLIP-style
    scorer when the model folder has one, else the transformer's mean
    log-likelihood of the codes (paper section 2.6 reranks with CLIP).
    """
    if not prompt or not prompt.strip():
        raise ValueError("type a prompt first")

    def call(pool: int, keep: int) -> DALLEOutput:
        return pipe(
            prompt, num_images=pool, seed=int(seed), options=options, rerank=True, keep=keep
        )

    return _best_of(pipe, call, num_images, candidates)


# --- editing ------------------------------------------------------------------------------


def editor_parts(value: Any) -> tuple[Image.Image | None, Image.Image | None]:
    """A gradio ImageEditor value -> (background image, painted mask or None).

    Every painted pixel (alpha > 0 in any layer) becomes white in the mask, i.e.
    is repainted.
    """
    if value is None:
        return None, None
    if isinstance(value, Image.Image):
        return value.convert("RGB"), None
    background = value.get("background")
    if background is None:
        return None, None
    check_pixels(background, "the uploaded image")  # before any mask is resized to it
    mask = None
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        alpha = layer.convert("RGBA").getchannel("A")
        if alpha.getbbox() is not None:
            mask = alpha if mask is None else ImageChops.lighter(mask, alpha)
    if mask is not None:
        mask = mask.point(lambda v: 255 if v else 0).resize(background.size)
    return background.convert("RGB"), mask


def edit(
    pipe: DALLEPipeline,
    image: Image.Image,
    prompt: str,
    box: str | tuple | None = None,
    mask: Image.Image | None = None,
    num_images: int = 4,
    seed: int = 0,
    options: SamplingOptions | None = None,
    candidates: int | None = None,
) -> list[tuple[Image.Image, str]]:
    """Regenerate a region of ``image`` (``dalle1.editing`` through the pipeline).

    A painted ``mask`` (white = repaint) wins over a typed ``box``, with a warning
    saying so; candidates are ranked best first by the log-likelihood of the kept codes
    after the region (:data:`EDIT_SCORE`) and the best ``num_images`` returned.
    """
    if image is None:
        raise ValueError("upload or pick an image first")
    check_pixels(image, "the uploaded image")
    if not prompt or not prompt.strip():
        raise ValueError("type a prompt describing the edited image")
    if mask is None and not box:
        raise ValueError("type a box x0,y0,x1,y1 or paint over the region to regenerate")
    if mask is not None and box:
        warnings.warn(
            f"both a painted region and the box {box} were given: the painted region is used; "
            "clear the box (or the painting) to choose",
            stacklevel=2,
        )

    def call(pool: int, keep: int) -> DALLEOutput:  # edits come back ranked best first
        return pipe(
            prompt,
            image=image,
            box=None if mask is not None else parse_box(box),
            mask_image=mask,
            candidates=pool,
            seed=int(seed),
            options=options,
        )

    return _best_of(pipe, call, num_images, candidates, EDIT_SCORE)


# --- the page -----------------------------------------------------------------------------


def example_images(pipe: DALLEPipeline, count: int = 8) -> list[str]:
    """The first held-out images the model folder carries (``examples/``), to pick from in
    the editing tab; never the training data (wherever the folder is, it shows the same)."""
    if pipe.folder is None:
        return []
    try:
        return [str(p) for p, _ in find_pairs(pipe.folder / "examples")[:count]]
    except FileNotFoundError:
        return []


def build_app(model: str | Path | DALLEPipeline, device: str = "cpu"):
    """The gradio Blocks app for a model folder (or a loaded pipeline)."""
    try:
        import gradio as gr
    except ImportError:  # pragma: no cover - depends on the optional extra
        raise ValueError("the web UI needs gradio: pip install 'dalle1[ui]'") from None
    name = "a loaded pipeline" if isinstance(model, DALLEPipeline) else str(model)
    pipe = (
        model if isinstance(model, DALLEPipeline) else DALLEPipeline.from_pretrained(model, device)
    )
    size = pipe.vae.cfg.image_size

    def wrap(fn):
        def run(*args):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    result = fn(*args)
                except ValueError as err:
                    raise gr.Error(str(err)) from None
            for note in dict.fromkeys(str(w.message) for w in caught):
                gr.Warning(note)
            return result

        return run

    start = recommended_controls(pipe)

    def sampling_controls(tab: str, candidates: int):
        with gr.Row():
            num = gr.Slider(1, 16, value=4, step=1, label="images", elem_id=f"{tab}-num")
            cands = gr.Slider(
                1,
                64,
                value=candidates,
                step=1,
                label="candidates (best shown)",
                elem_id=f"{tab}-candidates",
            )
            seed = gr.Number(value=0, precision=0, label="seed", elem_id=f"{tab}-seed")
        with gr.Row():
            temp = gr.Slider(
                0.0, 2.0, value=start["temperature"], step=0.05, label="temperature (0 = greedy)"
            )
            top_k = gr.Slider(
                0,
                pipe.dalle.shape.image_vocab,
                value=start["top_k"],
                step=1,
                label="top-k (0 = off)",
            )
            top_p = gr.Slider(0.0, 1.0, value=start["top_p"], step=0.01, label="top-p (1 = off)")
            guide = gr.Slider(
                1.0,
                10.0,
                value=max(1.0, start["cond_scale"]),
                step=0.5,
                label="guidance scale (1 = off)",
                elem_id=f"{tab}-guidance",
            )
        return [num, seed, temp, top_k, top_p, guide, cands]

    with gr.Blocks(title="dalle1") as app:
        gr.Markdown(
            f"## dalle1 — DALL-E 1 on `{name}`\n"
            f"{size}×{size} images, {pipe.vae.grid_size}×{pipe.vae.grid_size} codes, "
            f"{pipe.dalle.shape.image_vocab} image tokens. The controls start at the "
            f"model's recommended sampling: {pipe.recommended.describe()}."
        )
        with gr.Tab("Generate"):
            prompt = gr.Textbox(
                label="prompt", placeholder=prompt_placeholder(pipe), elem_id="prompt"
            )
            controls = sampling_controls("gen", start["candidates"])
            go = gr.Button("Generate", variant="primary", elem_id="generate")
            gallery = gr.Gallery(label="images", columns=4, elem_id="results", format="png")

            def on_generate(prompt, num, seed, temp, k, p, guide, cands):
                options = slider_options(temp, k, p, guide, pipe.recommended.options)
                return generate(pipe, prompt, num, seed, options, cands)

            go.click(wrap(on_generate), [prompt, *controls], gallery)
            prompt.submit(wrap(on_generate), [prompt, *controls], gallery)
        with gr.Tab("Edit"):
            gr.Markdown(
                "Upload an image (or pick one below), then **paint** over the part to regenerate, "
                "or type a **box** `x0,y0,x1,y1` in pixels of the image (x1, y1 exclusive)."
            )
            cell = max(1, size // pipe.vae.grid_size)  # one code cell: the unit an edit repaints
            editor = gr.ImageEditor(
                label="image",
                type="pil",
                elem_id="editor",
                brush=gr.Brush(default_size=cell, colors=["#ffffff"], color_mode="fixed"),
            )
            examples = example_images(pipe)
            if examples:
                gr.Examples(
                    examples=[[e] for e in examples], inputs=[editor], label="pick an image"
                )
            with gr.Row():
                edit_prompt = gr.Textbox(label="prompt", elem_id="edit-prompt")
                box = gr.Textbox(
                    label="box x0,y0,x1,y1 (or paint; not both)",
                    value="",
                    placeholder=f"0,{size // 2},{size},{size}",
                    elem_id="box",
                )
            edit_controls = sampling_controls("edit", 4)
            edit_go = gr.Button("Regenerate", variant="primary", elem_id="regenerate")
            edited = gr.Gallery(label="candidates", columns=4, elem_id="edited", format="png")

            def on_edit(value, prompt, box, num, seed, temp, k, p, guide, cands):
                image, mask = editor_parts(value)
                options = slider_options(temp, k, p, guide, pipe.recommended.options)
                return edit(pipe, image, prompt, box, mask, num, seed, options, cands)

            edit_go.click(wrap(on_edit), [editor, edit_prompt, box, *edit_controls], edited)
    return app


def local_theme():
    """gradio's default theme with system fonts only (the stock one loads web fonts)."""
    import gradio as gr

    return gr.themes.Default(font=LOCAL_FONTS, font_mono=LOCAL_MONO)


def launch(
    model: str | Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str = "cpu",
    block: bool = True,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
):
    """Build the app and serve it locally (never shared through gradio's tunnel); uploads
    over ``max_upload_bytes`` are refused by gradio before they are stored."""
    app = build_app(model, device)
    app.queue()
    app.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        prevent_thread_lock=not block,
        theme=local_theme(),
        footer_links=[],
        quiet=not block,
        max_file_size=max_upload_bytes,
    )
    return app
