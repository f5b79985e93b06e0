"""The ``dalle1`` command line: ``dalle1 train``, ``dalle1 sample``, ``dalle1 data shapes`` …

``train.py`` and ``sample.py`` at the top of the repository are the same
commands. Errors a user can fix (bad config key, missing folder, bad prompt,
an unwritable ``--out``, a full disk) print one line naming the file or the key
and exit with status 2 instead of a traceback; Ctrl-C prints one line and exits
with 130. The checks that need no model run before the model is loaded, and the
ones that need it before any sampling (see "errors" at the end of this file).

Every dalle1 module is imported here at the top, except two that only one command
needs and that are heavy or have side effects: :mod:`dalle1.training` (Lightning),
imported by ``dalle1 train``, and :mod:`dalle1.apps.ui` (the optional gradio extra),
imported by ``dalle1 ui``. So ``dalle1 sample`` or ``dalle1 data encode`` never load
Lightning.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.metadata
import json
import math
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import fields, replace
from pathlib import Path

import torch

from .apps.compose import (
    TEMPLATE,
    composition_report,
    defaults_report,
    judge_folder,
    model_holdout,
    tokenizer_report,
)
from .apps.evaluate import evaluate, read_prompts
from .apps.explain import explain
from .apps.synth import synthesize
from .checkpoint import ModelFolderError, load_vae
from .clip import zero_shot
from .codes import encode_data
from .config import ConfigError, DataConfig, load_config
from .data import CaptionedFolder, data_format, find_pairs, load_pairs, make_shapes_dataset
from .data.check import check_folder, format_report
from .data.emoji import make_emoji_dataset
from .data.glyphs import make_glyphs_dataset
from .data.problems import DataProblems
from .data.shards import write_shards
from .decoding import CACHE_DTYPES
from .editing import parse_box
from .evaluation import evaluate_vae
from .files import make_writable_folder, read_text
from .images import load_image, open_input, save_grid, stack_images
from .pipeline import DALLEPipeline, check_count
from .planning import GPUS, PlanOptions, format_plans, plan
from .recommend import Recommended, load_recommended
from .sampling import SamplingOptions

USER_ERRORS = (ConfigError, ModelFolderError, FileNotFoundError, ValueError)

# subcommand name -> (function adding its arguments, function running it)
COMMANDS: dict[str, tuple[Callable, Callable]] = {}


def command(name: str, add_args: Callable):
    def register(run: Callable) -> Callable:
        COMMANDS[name] = (add_args, run)
        return run

    return register


# --- sampling options, shared by sample, edit, eval and synth ---------------------------


RECOMMENDED_HELP = "(default: the model's sampling.json)"


def add_sampling_args(p: argparse.ArgumentParser, seed_help: str) -> None:
    """The flags of :class:`dalle1.sampling.SamplingOptions` (read back by sampling_options),
    with the seed and the device every sampling command takes. A flag left out takes the
    model folder's recommended value (dalle1/recommend.py)."""
    g = p.add_argument_group("sampling (flags left out take the model's sampling.json values)")
    g.add_argument("--seed", type=int, default=0, help=seed_help)
    g.add_argument("--temperature", type=float, default=None, help=f"0 = greedy {RECOMMENDED_HELP}")
    g.add_argument(
        "--top-k",
        type=int,
        default=None,
        help=f"sample among the k likeliest codes, 0 = off {RECOMMENDED_HELP}",
    )
    g.add_argument(
        "--top-p",
        type=float,
        default=None,
        help=f"nucleus sampling over image codes, 1 = off {RECOMMENDED_HELP}",
    )
    g.add_argument(
        "--cond-scale",
        type=float,
        default=None,
        help=f"classifier-free guidance scale, 1 = off {RECOMMENDED_HELP}",
    )
    g.add_argument(
        "--guidance-top-p",
        type=float,
        default=None,
        help=f"with guidance, draw only among the conditional model's top-p codes, 1 = off "
        f"{RECOMMENDED_HELP}",
    )
    add_device_arg(g)
    g.add_argument(
        "--cache-dtype",
        choices=list(CACHE_DTYPES),
        default=None,
        help="key/value cache dtype while sampling; bfloat16 halves its bytes, faster at large "
        "grids and batches on a GPU or a CPU with AMX (elsewhere only smaller), not bit-exact "
        "(default: $DALLE1_CACHE_DTYPE, else the weights')",
    )


def load_pipeline(args: argparse.Namespace) -> DALLEPipeline:
    """The model folder of ``--model`` on ``--device``, with ``--cache-dtype`` if given."""
    device = check_device(args.device)
    cache_dtype = getattr(args, "cache_dtype", None)
    return DALLEPipeline.from_pretrained(args.model, device=device, cache_dtype=cache_dtype)


def add_device_arg(p) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="torch device: auto (CUDA if available, else CPU), cpu, cuda, …",
    )


def sampling_options(
    args: argparse.Namespace, base: SamplingOptions | None = None
) -> SamplingOptions:
    """The :class:`SamplingOptions` of the flags :func:`add_sampling_args` added, on top of
    ``base`` (the model's recommended options): flags left out keep base's values, and
    ``--top-k 0`` / ``--top-p 1`` / ``--guidance-top-p 1`` switch a filter off."""
    base = base if base is not None else SamplingOptions()
    given = {f.name: getattr(args, f.name, None) for f in fields(SamplingOptions)}
    given = {k: v for k, v in given.items() if v is not None}  # flags left out keep base's
    if given.get("top_k") == 0:
        given["top_k"] = None
    for name in ("top_p", "guidance_top_p"):  # a nucleus of 1 holds every code: off
        if given.get(name, 0) >= 1:
            given[name] = None
    return replace(base, **given)


@contextlib.contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """Show Python warnings (a truncated prompt, repeated candidates, a doubtful edit) as
    ``dalle1 COMMAND: warning: ...`` lines on stderr, once each."""
    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if text not in shown:
            shown.add(text)
            print(f"dalle1 {command}: warning: {text}", file=sys.stderr)

    previous = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = show
        try:
            yield
        finally:
            warnings.showwarning = previous


# --- train -------------------------------------------------------------------------------


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/demo_vae.yaml")
    p.add_argument(
        "--resume", action="store_true", help="continue from out_dir/checkpoints/last.ckpt"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an out_dir that holds an earlier run (deletes its checkpoints, logs)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override config values, e.g. train.max_steps=100",
    )


@command("train", add_train_args)
def run_train(args: argparse.Namespace) -> None:
    """Train one stage (vae, dalle or clip) as the YAML config says; Ctrl-C saves a checkpoint."""
    from .training import TrainingInterrupted, fit  # Lightning: only `dalle1 train` imports it

    config = load_config(args.config, args.overrides)
    again = " ".join(["--config", args.config, *args.overrides, "--resume"])
    try:
        folder = fit(config, resume=args.resume, overwrite=args.overwrite)
    except TrainingInterrupted as stop:
        print(
            f"dalle1 train: interrupted at step {stop.step}; checkpoint saved to "
            f"{stop.checkpoint}\ncontinue with: python train.py {again}",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    print(f"model folder: {folder}")


# --- sample ------------------------------------------------------------------------------


def add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder written by train.py")
    p.add_argument("--prompt", action="append", required=True, help="caption; repeat for several")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt")
    add_sampling_args(p, "image i uses seed + i")
    p.add_argument(
        "--out", default="outputs/samples", help="folder for the PNGs, grid.png and captions.txt"
    )
    p.add_argument("--scale", type=int, default=4, help="upscale factor for grid.png (nearest)")
    p.add_argument(
        "--rerank",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--rerank: order the --num-images of each prompt best first (clip/ scorer, else "
        "the model's likelihood); --no-rerank: never. Left out: as the model's sampling.json "
        "recommends (its 'candidates' per image, best kept)",
    )
    p.add_argument(
        "--keep", type=int, default=None, help="with --rerank: keep the best K per prompt"
    )
    add_edit_flags(p)  # --image … turns `sample` into `edit`


@command("sample", add_sample_args)
def run_sample(args: argparse.Namespace) -> None:
    """Sample images for prompts (grid.png, PNGs, captions.txt); --image … edits instead."""
    if args.image is not None or edit_mode_flags(args):
        run_edit(args)
        return
    check_count("--num-images", args.num_images, args.num_images * len(args.prompt))
    if args.keep is not None and args.rerank is False:
        raise ValueError("--keep needs --rerank")
    if args.keep is not None and args.keep > args.num_images:
        raise ValueError(f"--keep {args.keep} is more than --num-images {args.num_images}")
    out = output_folder(args.out)
    pipe = load_pipeline(args)
    with one_line_warnings("sample"):
        result = pipe(
            args.prompt,
            num_images=args.num_images,
            seed=args.seed,
            options=sampling_options(args, pipe.recommended.options),
            rerank=args.rerank,
            keep=args.keep,
            progress=True,
        )
    per_prompt = len(result.images) // len(args.prompt)
    lines = []
    scores = result.scores or [None] * len(result.images)
    for i, (image, prompt, seed, score) in enumerate(
        zip(result.images, result.prompts, result.seeds, scores)
    ):
        name = f"{i // per_prompt:02d}_{i % per_prompt:02d}.png"
        image.save(out / name)
        tail = "" if score is None else f"\tscore={score:.4f}"
        lines.append(f"{name}\tseed={seed}{tail}\t{prompt}")
    save_grid(result.pixels, out / "grid.png", nrow=per_prompt, scale=args.scale)
    rows = [f"row {r + 1}: {p}" for r, p in enumerate(args.prompt)]
    used = Recommended(result.options, result.candidates, "clip" if pipe.clip else "likelihood")
    rows.append(f"sampling: {used.describe()}")
    (out / "captions.txt").write_text("\n".join(rows + [""] + lines) + "\n")
    print(f"wrote {len(result.images)} images and grid.png to {out}")


# --- edit --------------------------------------------------------------------------------


def add_edit_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "editing (give --image and one of --box, --mask, --complete-rows, --variation)"
    )
    g.add_argument("--image", default=None, help="image to edit")
    g.add_argument(
        "--box", default=None, metavar="x0,y0,x1,y1", help="region to repaint, in pixels"
    )
    g.add_argument("--mask", default=None, help="mask image: white = repaint, black = keep")
    g.add_argument(
        "--complete-rows",
        type=int,
        default=None,
        metavar="K",
        help="keep the top K rows of codes and sample the rest (paper: 15 of 32)",
    )
    g.add_argument(
        "--variation",
        type=float,
        default=None,
        metavar="FRACTION",
        help="re-sample this fraction of the codes (see --variation-mode)",
    )
    g.add_argument(
        "--variation-mode",
        choices=("random", "lower"),
        default="random",
        help="random: a seeded random FRACTION of the cells; lower: the bottom rows",
    )
    g.add_argument("--mask-seed", type=int, default=0, help="seed of the random variation cells")
    g.add_argument(
        "--candidates", type=int, default=None, help="samples to rank (default: --num-images or 4)"
    )
    g.add_argument(
        "--no-composite",
        action="store_true",
        help="keep the decoder's pixels everywhere instead of pasting the input outside the region",
    )
    g.add_argument(
        "--feather", type=int, default=0, help="soft blend of this many px at the border"
    )


def edit_mode_flags(args: argparse.Namespace) -> list[str]:
    given = {
        "--box": args.box,
        "--mask": args.mask,
        "--complete-rows": args.complete_rows,
        "--variation": args.variation,
    }
    return [k for k, v in given.items() if v is not None]


def add_edit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder written by train.py")
    p.add_argument(
        "--prompt", action="append", default=None, help="caption (none = the empty caption)"
    )
    add_sampling_args(p, "candidate i uses seed + i")
    p.add_argument("--out", default="outputs/edits", help="folder for the PNGs and grid.png")
    p.add_argument("--scale", type=int, default=4, help="upscale factor for grid.png (nearest)")
    add_edit_flags(p)


@command("edit", add_edit_args)
def run_edit(args: argparse.Namespace) -> None:
    """Repaint a box or mask of an image, complete it from its top rows, or make variations."""
    modes = edit_mode_flags(args)
    if args.image is None:
        raise ValueError(f"{' '.join(modes) or 'editing'} needs --image")
    if len(modes) != 1:
        raise ValueError("give one of --box, --mask, --complete-rows, --variation")
    prompts = args.prompt or [""]
    if len(prompts) != 1:
        raise ValueError(f"editing takes one --prompt, got {len(prompts)}")
    candidates = args.candidates
    if candidates is None:  # an explicit --candidates 0 is an error, not the default
        candidates = getattr(args, "num_images", None) or 4
    check_count("--candidates", candidates)
    box = parse_box(args.box) if args.box is not None else None
    image = open_input(args.image)  # before the model: a bad file fails in a second
    mask = open_input(args.mask, "mask image") if args.mask is not None else None
    out = output_folder(args.out)
    pipe = load_pipeline(args)
    size = pipe.vae.cfg.image_size
    if not 0 <= args.feather <= size:
        raise ValueError(
            f"--feather {args.feather} must lie in [0, {size}] (the model's image size)"
        )
    common = dict(
        candidates=candidates,
        seed=args.seed,
        options=sampling_options(args, pipe.recommended.options),
        composite=not args.no_composite,
        feather=args.feather,
        progress=True,
    )
    with one_line_warnings("edit"):
        result = _run_edit(pipe, args, image, mask, box, prompts[0], common)
    result.original.save(out / "original.png")
    result.mask.save(out / "mask.png")
    lines = []
    for i, (image, seed, score) in enumerate(zip(result.images, result.seeds, result.scores)):
        image.save(out / f"{i:02d}.png")
        lines.append(f"{i:02d}.png\tseed={seed}\tscore={score:.4f}")
    references = stack_images([result.original, result.mask], pipe.vae.cfg.image_size)
    panels = torch.cat([references, result.pixels.to(references.device)])
    save_grid(panels, out / "grid.png", nrow=len(panels), scale=args.scale)
    header = [
        f"prompt: {prompts[0]!r}",
        "grid.png: original, mask (white = repainted), then candidates best first",
        "score: log-likelihood (nats) of the kept codes after the region; 0 = none after it",
        f"sampling: {Recommended(result.options).describe()}",
        *[f"warning: {note}" for note in result.warnings],
        "",
    ]
    (out / "scores.txt").write_text("\n".join(header + lines) + "\n")
    print(f"wrote {len(result.images)} candidates and grid.png to {out}")


def _run_edit(
    pipe: DALLEPipeline, args: argparse.Namespace, image, mask, box, prompt: str, common: dict
):
    """The one edit the flags ask for: a box, a mask, a completion or variations."""
    if box is not None:
        return pipe.edit(image, prompt, box=box, **common)
    if mask is not None:
        return pipe.edit(image, prompt, mask_image=mask, **common)
    if args.complete_rows is not None:
        return pipe.complete(image, prompt, rows=args.complete_rows, **common)
    return pipe.variations(
        image,
        prompt,
        fraction=args.variation,
        mode=args.variation_mode,
        mask_seed=args.mask_seed,
        **common,
    )


# --- data --------------------------------------------------------------------------------


def add_data_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True, parser_class=OneLineParser)
    shapes = sub.add_parser("shapes", help="write the built-in synthetic shapes dataset")
    shapes.add_argument("out", help="folder for the PNG + same-stem .txt caption pairs")
    shapes.add_argument("--count", type=int, default=4000, help="images to draw")
    shapes.add_argument("--image-size", type=int, default=32, help="pixels per side")
    shapes.add_argument(
        "--max-shapes", type=int, default=1, choices=(1, 2), help="shapes per image"
    )
    shapes.add_argument("--seed", type=int, default=0, help="same seed, same images")
    glyphs = sub.add_parser(
        "glyphs", help="write a second built-in set: coloured digits ('a red seven')"
    )
    glyphs.add_argument("out", help="folder for the PNG + same-stem .txt caption pairs")
    glyphs.add_argument("--count", type=int, default=3000, help="images to draw")
    glyphs.add_argument("--image-size", type=int, default=32, help="pixels per side")
    glyphs.add_argument("--seed", type=int, default=0, help="same seed, same images")
    add_data_format_args(sub)
    add_data_check_args(sub)


@command("data", add_data_args)
def run_data(args: argparse.Namespace) -> None:
    """Datasets: the built-in shapes and digits, emoji; check, shard or pre-encode a folder."""
    if args.data_command in DATA_FORMAT_COMMANDS:
        return run_data_format(args)
    if args.data_command == "check":
        return run_data_check(args)
    if args.data_command == "shapes":
        path = make_shapes_dataset(
            args.out, args.count, args.image_size, args.seed, args.max_shapes
        )
        print(f"wrote {args.count} captioned images to {path}")
    if args.data_command == "glyphs":
        path = make_glyphs_dataset(args.out, args.count, args.image_size, args.seed)
        print(f"wrote {args.count} captioned images to {path}")


# --- data check: list the files training would skip or convert ---------------------------


def add_data_check_args(sub) -> None:
    check = sub.add_parser(
        "check", help="list unreadable images, missing/empty/odd captions; no training"
    )
    check.add_argument("dir", help="folder of images with same-stem .txt captions")
    check.add_argument(
        "--image-size", type=int, default=None, help="report images smaller than this (upscaled)"
    )
    check.add_argument(
        "--skipped-only", action="store_true", help="list only files that would be skipped"
    )


def run_data_check(args: argparse.Namespace) -> None:
    """Exit status 0 if every image would be used, 1 if some would be skipped."""
    usable, problems = check_folder(args.dir, args.image_size)
    if args.skipped_only:
        kept = DataProblems()
        for p in problems.read():
            if p.action == "skipped":
                kept.record(p.path, p.reason)
        problems = kept
    print(format_report(usable, problems))
    if problems.skipped():
        raise SystemExit(1)


# --- data shard / encode / emoji: other formats, pre-tokenised images, the emoji set -------

DATA_FORMAT_COMMANDS = ("shard", "encode", "emoji")


def add_data_format_args(sub) -> None:
    shard = sub.add_parser("shard", help="pack a folder or manifest into WebDataset tar shards")
    shard.add_argument("src", help="folder of images + .txt, a .jsonl/.csv manifest, or shards")
    shard.add_argument("out", help="folder for shard-000000.tar, shard-000001.tar, ...")
    shard.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    shard.add_argument("--prefix", default="shard", help="shard file name prefix")
    encode = sub.add_parser("encode", help="run a trained VAE once and store the image codes")
    encode.add_argument("--model", required=True, help="model folder holding the VAE")
    encode.add_argument("--data", required=True, help="folder, manifest or shards to encode")
    encode.add_argument("--out", required=True, help="codes folder (set data.codes to it)")
    encode.add_argument("--batch-size", type=int, default=64, help="images encoded at once")
    emoji = sub.add_parser("emoji", help="render Noto Color Emoji with Unicode names as captions")
    emoji.add_argument("out", help="folder for the PNG + .txt pairs")
    emoji.add_argument("--size", type=int, default=64, help="pixels per side")
    emoji.add_argument("--font", default=None, help="path to NotoColorEmoji.ttf")
    emoji.add_argument("--limit", type=int, default=None, help="render at most this many")


def run_data_format(args: argparse.Namespace) -> None:
    if args.data_command == "shard":
        cfg = DataConfig(path=args.src)
        if data_format(cfg) == "webdataset":
            raise ValueError(f"'{args.src}' already holds shards")
        problems = DataProblems()
        paths = write_shards(
            load_pairs(cfg, problems), args.out, args.shard_size, args.prefix, problems=problems
        )
        skipped = f"; {problems.summary()}" if problems.read() else ""
        print(f"wrote {len(paths)} shards and shards.json to {args.out}{skipped}")
    elif args.data_command == "encode":
        output_folder(args.out)  # before encoding: an unwritable --out fails now, not at the end
        out = encode_data(args.model, DataConfig(path=args.data), args.out, args.batch_size)
        print(f"wrote codes to {out} (train with data.codes={out})")
    elif args.data_command == "emoji":
        count = make_emoji_dataset(args.out, args.size, font_path=args.font, limit=args.limit)
        print(f"wrote {count} captioned emoji to {args.out}")


# --- classify / eval / synth: the contrastive scorer (dalle1/clip.py, docs/rerank.md) --------


def parse_list(value: str) -> list[str]:
    """A comma-separated list, or the path of a file with one item per line."""
    path = Path(value)
    if path.exists() and not path.is_dir():  # a file of items (a pipe or a device is refused)
        items = [line.strip() for line in read_text(path, "list").splitlines()]
    else:
        items = [item.strip() for item in value.split(",")]
    items = [item for item in items if item and not item.startswith("#")]
    if not items:
        raise ValueError(f"'{value}' names no items (give a comma-separated list or a file)")
    return items


def add_classify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder with clip/ (train stage clip)")
    p.add_argument(
        "--labels", required=True, help="comma-separated labels, or a file with one per line"
    )
    p.add_argument(
        "--template",
        action="append",
        default=None,
        help="caption with {} for the label (default 'a {}'); repeat to average several",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    add_device_arg(p)
    p.add_argument("images", nargs="+", help="image files")


@command("classify", add_classify_args)
def run_classify(args: argparse.Namespace) -> None:
    """Zero-shot classification of images with the model's contrastive scorer."""
    pipe = load_pipeline(args)
    if pipe.clip is None:
        raise ValueError(f"'{args.model}' has no clip/ scorer; train one with train.stage=clip")
    labels = parse_list(args.labels)
    templates = args.template or ["a {}"]
    for path in args.images:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image '{path}' does not exist")
    images = [load_image(path, pipe.clip.image_size) for path in args.images]
    probs = zero_shot(pipe.clip, pipe.tokenizer, torch.stack(images), labels, templates)
    for path, row in zip(args.images, probs):
        best = int(row.argmax())
        if args.json:
            scores = {label: round(float(p), 6) for label, p in zip(labels, row)}
            print(json.dumps({"file": path, "label": labels[best], "probs": scores}))
        else:
            print(f"{path}\t{labels[best]}\t{float(row[best]):.4f}")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (clip/ enables the scorer figures)")
    p.add_argument("--data", default=None, help="captioned folder (image + same-stem .txt)")
    p.add_argument(
        "--prompts",
        default=None,
        help='JSONL {"prompt": ..., "label": ...} or lines "label<TAB>prompt" / "prompt"',
    )
    g = p.add_argument_group(
        "composition (built-in shapes): seen vs never-seen colour x shape pairs, no --data needed"
    )
    g.add_argument("--compose", action="store_true", help="report the compositional benchmark")
    g.add_argument(
        "--holdout",
        default=None,
        help="never-seen pairs, comma-separated ('red square,blue triangle'); "
        "default: data.synthetic_holdout of the model's training config",
    )
    g.add_argument(
        "--samples",
        default=None,
        help="judge this folder of drawn images instead of sampling (each image beside a "
        "same-stem .txt naming its pair, e.g. 'a large red circle in the center')",
    )
    g.add_argument("--scales", default="1,2,3", help="guidance scales to report, comma-separated")
    g.add_argument("--per-prompt", type=int, default=8, help="samples judged per pair and scale")
    g.add_argument(
        "--rerank-candidates",
        type=int,
        default=32,
        help="also report the best --per-prompt of this many, reranked (0 = skip)",
    )
    p.add_argument(
        "--split",
        choices=("val", "all"),
        default="val",
        help="val: the held-out part of --data under the model's own split; all: every pair",
    )
    p.add_argument("--max-pairs", type=int, default=1024, help="held-out pairs for the NLL")
    p.add_argument("--num-images", type=int, default=32, help="samples per prompt")
    p.add_argument("--keep", type=int, default=4, help="best samples kept when reranking")
    p.add_argument(
        "--template",
        action="append",
        default=None,
        help="zero-shot template with {} for the label (default '{}'); repeat to average",
    )
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    add_sampling_args(p, "image i of prompt p uses seed + p * num_images + i")


@command("eval", add_eval_args)
def run_eval(args: argparse.Namespace) -> None:
    """Held-out bits per token, scorer figures with and without reranking, label accuracy;
    or (--compose) seen vs never-seen accuracy on the built-in shapes."""
    if args.compose:
        return run_compose(args)
    if args.data is None or args.prompts is None:
        raise ValueError("dalle1 eval needs --data and --prompts (or --compose)")
    prompts = read_prompts(args.prompts)
    if args.keep > args.num_images:
        raise ValueError(f"--keep {args.keep} is more than --num-images {args.num_images}")
    if args.out:
        output_file(args.out)
    pipe = load_pipeline(args)
    result = evaluate(
        pipe,
        args.data,
        prompts,
        num_images=args.num_images,
        keep=args.keep,
        split=args.split,
        max_pairs=args.max_pairs,
        templates=args.template,
        seed=args.seed,
        options=sampling_options(args, pipe.recommended.options),
    )
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


def add_synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (clip/ gives the scores)")
    p.add_argument(
        "--classes", required=True, help="comma-separated class names, or a file, one per line"
    )
    p.add_argument(
        "--templates",
        default=None,
        help="file of prompt templates, one per line with {} for the class (default 'a {}')",
    )
    p.add_argument("--per-class", type=int, required=True, help="images made per class")
    p.add_argument(
        "--min-score", type=float, default=None, help="drop (and count) images scoring below"
    )
    p.add_argument("--out", required=True, help="output folder: <class>/*.png + manifest.jsonl")
    p.add_argument("--batch-size", type=int, default=16, help="images sampled at once")
    add_sampling_args(p, "base seed: an image's seed depends on it, its class and index")


@command("synth", add_synth_args)
def run_synth(args: argparse.Namespace) -> None:
    """Synthesize a labelled ImageFolder dataset, filtered by score; resumable."""
    classes = parse_list(args.classes)
    if args.templates is None:
        templates = ["a {}"]
    elif Path(args.templates).is_file():
        templates = parse_list(args.templates)
    else:
        raise FileNotFoundError(f"templates file '{args.templates}' does not exist")
    output_folder(args.out)
    pipe = load_pipeline(args)
    summary = synthesize(
        pipe,
        classes,
        templates,
        args.per_class,
        args.out,
        min_score=args.min_score,
        seed=args.seed,
        batch_size=args.batch_size,
        options=sampling_options(args, pipe.recommended.options),
    )
    print(json.dumps(summary))


# --- explain / ui: pictures of the mechanics, the local web page (docs/tour.md, docs/ui.md) --


def add_explain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder written by train.py")
    p.add_argument("--out", default="outputs/explain", help="folder for the pictures")
    p.add_argument("--prompt", default=None, help="caption for the stream layout and animation")
    p.add_argument(
        "--images",
        nargs="*",
        default=None,
        help="images to reconstruct (default: the model folder's examples/)",
    )
    p.add_argument("--schedule-only", action="store_true", help="draw only the configured masks")
    p.add_argument("--edit-image", default=None, help="image to edit (default: the first example)")
    p.add_argument("--edit-prompt", default=None, help="caption of the edit (default: --prompt)")
    p.add_argument("--edit-box", default=None, help="x0,y0,x1,y1 pixels (default: the middle half)")
    add_sampling_args(p, "the animated sample uses --seed")


@command("explain", add_explain_args)
def run_explain(args: argparse.Namespace) -> None:
    """Draw the token stream, attention masks, raster order, VAE and training pictures."""
    result = explain(
        args.model,
        args.out,
        prompt=args.prompt,
        seed=args.seed,
        images=args.images,
        all_kinds=not args.schedule_only,
        edit_image=args.edit_image,
        edit_prompt=args.edit_prompt,
        edit_box=None if args.edit_box is None else parse_box(args.edit_box),
        options=sampling_options(args, load_recommended(args.model).options),
        device=check_device(args.device),
    )
    for name in result.files:
        print(f"wrote {Path(args.out) / name}")
    for name, why in result.skipped.items():
        print(f"skipped {name}: {why}")


def add_ui_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder written by train.py")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (local by default)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on")
    add_device_arg(p)


@command("ui", add_ui_args)
def run_ui(args: argparse.Namespace) -> None:
    """Serve the web page: prompt -> images with scores, and region editing (needs dalle1[ui])."""
    from .apps.ui import launch  # the optional gradio extra: only `dalle1 ui` imports it

    launch(args.model, host=args.host, port=args.port, device=args.device)


def run_compose(args: argparse.Namespace) -> None:
    """``dalle1 eval --compose``: :func:`dalle1.apps.compose.composition_report` as JSON."""
    scales = [float(x) for x in parse_list(args.scales)]
    if args.per_prompt < 1 or args.rerank_candidates < 0:
        raise ValueError("--per-prompt must be >= 1 and --rerank-candidates >= 0")
    if args.out:
        output_file(args.out)
    holdout = parse_list(args.holdout) if args.holdout else model_holdout(args.model)
    if args.samples:
        print(json.dumps({"holdout": holdout, **judge_folder(args.samples, holdout)}, indent=2))
        return
    pipe = load_pipeline(args)
    defaults = defaults_report(pipe, holdout, args.per_prompt, args.seed, progress=True)
    rows = composition_report(
        pipe,
        holdout,
        scales,
        per_prompt=args.per_prompt,
        rerank_candidates=args.rerank_candidates,
        options=sampling_options(args, pipe.recommended.options),
        seed=args.seed,
        progress=True,
    )
    result = {"holdout": holdout, "template": TEMPLATE, "defaults": defaults, "rows": rows}
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


# --- eval-vae: reconstruction quality of an image tokenizer (docs/vae.md) ----------------


def add_eval_vae_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder holding a VAE (or its vae/ part)")
    p.add_argument("--data", required=True, help="folder of images with same-stem .txt captions")
    p.add_argument(
        "--out", default=None, help="folder for metrics.json and recon.png (default: none written)"
    )
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N images only; 0 = all")
    p.add_argument("--batch-size", type=int, default=64, help="images encoded at once")
    p.add_argument("--grid", type=int, default=8, help="images in recon.png (originals above)")
    p.add_argument("--scale", type=int, default=2, help="upscale factor for recon.png (nearest)")
    p.add_argument(
        "--holdout",
        default=None,
        help="never-seen colour x shape pairs to report beside seen ones, comma-separated; "
        "default: data.synthetic_holdout of the model's training config",
    )


@command("eval-vae", add_eval_vae_args)
def run_eval_vae(args: argparse.Namespace) -> None:
    """Reconstruction PSNR / MSE and codebook usage of a VAE on a folder, as JSON."""
    if args.limit < 0 or args.batch_size < 1 or args.grid < 0:
        raise ValueError("--limit, --grid must be >= 0 and --batch-size >= 1")
    vae = load_vae(args.model)
    pairs = find_pairs(args.data)
    if args.limit:
        pairs = pairs[: args.limit]
    data = CaptionedFolder(None, vae.cfg.image_size, pairs)
    metrics = {**evaluate_vae(vae, data, batch_size=args.batch_size), "images": len(data)}
    holdout = parse_list(args.holdout) if args.holdout else model_holdout(args.model)
    if holdout:  # clean renders of seen and never-seen pairs (dalle1.apps.compose)
        metrics["composition"] = {"holdout": holdout, **tokenizer_report(vae, holdout)}
    print(json.dumps(metrics))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if args.grid:
            n = min(args.grid, len(data))
            originals = torch.stack([data[i][0] for i in range(n)])
            with torch.no_grad():
                recons = vae.decode(vae.encode(originals))
            save_grid(torch.cat([originals, recons]), out / "recon.png", nrow=n, scale=args.scale)


# --- plan: parameters, memory per GPU, FLOPs, step time and decode speed of a config ---------


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config of a transformer stage")
    p.add_argument(
        "--gpus",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="GPU counts to plan for, one column each (default: train.devices x train.num_nodes)",
    )
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU model (datasheet)")
    p.add_argument(
        "--strategy", choices=("fsdp", "ddp"), default=None, help="default: train.strategy"
    )
    p.add_argument("--precision", default=None, help="default: train.precision")
    p.add_argument("--micro-batch", type=int, default=1, help="samples per GPU per forward pass")
    p.add_argument(
        "--global-batch",
        type=int,
        default=0,
        help="samples per optimizer step (default: data.batch_size x GPUs of the config x accumulation)",
    )
    p.add_argument("--mfu", type=float, default=0.4, help="assumed MFU for the step time")
    p.add_argument("--decode-batch", type=int, default=64, help="images decoded at once")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


@command("plan", add_plan_args)
def run_plan(args: argparse.Namespace) -> None:
    """Plan a run: parameters, memory per GPU, FLOPs, step time, decode tokens/s (no GPU needed)."""
    config = load_config(args.config, args.overrides)
    t = config.train
    devices = t.devices if isinstance(t.devices, int) and t.devices > 0 else 1
    strategy = args.strategy or ("fsdp" if t.strategy == "fsdp" else "ddp")
    precision = args.precision or t.precision
    if precision == "auto":  # every GPU in GPUS has bf16, which auto trains in there
        precision = "bf16-mixed"
    plans = [
        plan(
            config,
            PlanOptions(
                gpus=gpus,
                gpu=args.gpu,
                strategy=strategy,
                precision=precision,
                micro_batch=args.micro_batch,
                global_batch=args.global_batch,
                checkpointing=t.activation_checkpointing,
                mfu=args.mfu,
                decode_batch=args.decode_batch,
            ),
        )
        for gpus in args.gpus or [devices * t.num_nodes]
    ]
    print(json.dumps(plans, indent=2) if args.json else format_plans(plans))


# --- errors: one line naming the file or the key, exit status 2 -----------------------------

#: the least value of each numeric flag, wherever a command has it (checked before any work)
AT_LEAST = {
    "num_images": 1,
    "keep": 1,
    "candidates": 1,
    "batch_size": 1,
    "per_class": 1,
    "shard_size": 1,
    "count": 1,
    "image_size": 1,
    "size": 1,
    "scale": 1,
    "max_pairs": 1,
    "top_k": 1,
    "feather": 0,
    "grid": 0,
    "limit": 0,
    "complete_rows": 0,
    "port": 1,
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``dalle1 sample: error: …``), exit status 2,
    and every --help shows the defaults (:class:`HelpFormatter`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def check_flags(args: argparse.Namespace) -> None:
    """The numeric flags of :data:`AT_LEAST` and the sampling options, before any work."""
    for dest, least in AT_LEAST.items():
        value = getattr(args, dest, None)
        if isinstance(value, int) and value < least:
            raise ValueError(f"--{dest.replace('_', '-')} must be >= {least}, got {value}")
    if hasattr(args, "temperature"):
        sampling_options(args).check()
    for dest in ("min_score", "variation"):
        value = getattr(args, dest, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{dest.replace('_', '-')} must be a finite number, got {value}")


def check_device(name: str) -> str:
    """``--device``: a device torch knows and this machine has (``auto`` is left as it is)."""
    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, mps …)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name}: no CUDA GPU is available here (torch.cuda.is_available() is "
                "False); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")
    return name


def _writable(folder: Path, flag: str) -> None:
    try:
        make_writable_folder(folder)
    except OSError as err:
        raise ValueError(
            f"{flag} '{folder}' is not a writable folder ({err.strerror or err})"
        ) from None


def output_folder(path: str | Path, flag: str = "--out") -> Path:
    """A folder the command will write into, created and test-written before the long work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} '{path}' is a file, not a folder")
    _writable(path, flag)
    return path


def output_file(path: str | Path, flag: str = "--out") -> Path:
    """A file the command will write, checked before the long work (its folder is writable)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} '{path}' is a folder, not a file name")
    _writable(path.parent, flag)
    return path


def error_line(err: BaseException) -> str | None:
    """The one-line message of an error a user can fix, or None for a bug (a traceback)."""
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
        name = err.filename or ""
        where = f" '{name}'" if name else ""
        if err.errno == errno.ENOSPC:
            return f"no space left on the device while writing{where}"
        return f"cannot use{where}: {err.strerror or err}"
    if isinstance(err, USER_ERRORS):
        return str(err)
    if type(err).__name__ == "MisconfigurationException":  # Lightning's, raised inside fit
        return f"Lightning: {err}"
    if isinstance(err, RuntimeError) and "Error(s) in loading state_dict" in str(err):
        return (
            "the checkpoint does not fit the model this config builds (was the architecture "
            f"changed since the run began?): {str(err).splitlines()[0]}"
        )
    if isinstance(err, RecursionError):
        return "input nested too deeply"
    return None


# --- entry point -------------------------------------------------------------------------


def package_version() -> str:
    """The installed distribution's version (pyproject.toml), "unknown" when not installed."""
    try:
        return importlib.metadata.version("dalle1")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every --help shows the defaults, except the "(default: None)" of flags whose help
    says what leaving them out means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action, argparse._VersionAction):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dalle1",
        description="DALL-E 1 (Ramesh et al. 2021): train the dVAE and the transformer, "
        "sample, edit, rerank and explain.",
    )
    parser.add_argument("--version", action="version", version=f"dalle1 {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, (add_args, run) in COMMANDS.items():
        summary = (run.__doc__ or name).strip().splitlines()[0]
        add_args(sub.add_parser(name, help=summary, description=summary))
    return parser


def main(argv: list[str] | None = None, command_name: str | None = None) -> int:
    """Run a subcommand; ``command_name`` fixes it (train.py / sample.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if command_name is not None:
        argv = [command_name, *argv]
    # `--train.max_steps=5` is accepted as well as `train.max_steps=5`
    argv = [
        a[2:] if a.startswith("--") and "=" in a and "." in a.split("=")[0] else a for a in argv
    ]
    args = build_parser().parse_args(argv)
    try:
        check_flags(args)
        COMMANDS[args.command][1](args)
    except KeyboardInterrupt:
        print(f"dalle1 {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - user errors become one line, bugs stay tracebacks
        line = error_line(err)
        if line is None:
            raise
        line = " ".join(line.split())  # one line, whatever the message held
        print(f"dalle1 {args.command}: error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
