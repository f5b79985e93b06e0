"""The ``dalle1`` command line: ``dalle1 train``, ``dalle1 sample``, ``dalle1 data shapes`` …

``train.py`` and ``sample.py`` at the top of the repository are the same
commands. Errors a user can fix (bad config key, missing folder, bad prompt)
print one line and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .checkpoint import ModelFolderError
from .config import ConfigError

USER_ERRORS = (ConfigError, ModelFolderError, FileNotFoundError, ValueError)

# subcommand name -> (function adding its arguments, function running it)
COMMANDS: dict[str, tuple[Callable, Callable]] = {}


def command(name: str, add_args: Callable):
    def register(run: Callable) -> Callable:
        COMMANDS[name] = (add_args, run)
        return run

    return register


# --- train -------------------------------------------------------------------------------


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/demo_vae.yaml")
    p.add_argument(
        "--resume", action="store_true", help="continue from out_dir/checkpoints/last.ckpt"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override config values, e.g. train.max_steps=100",
    )


@command("train", add_train_args)
def run_train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .training import fit

    config = load_config(args.config, args.overrides)
    folder = fit(config, resume=args.resume)
    print(f"model folder: {folder}")


# --- sample ------------------------------------------------------------------------------


def add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder written by train.py")
    p.add_argument("--prompt", action="append", required=True, help="caption; repeat for several")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument(
        "--top-k", type=int, default=None, help="sample among the k likeliest image codes"
    )
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling over image codes")
    p.add_argument("--cond-scale", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument(
        "--out", default="outputs/samples", help="folder for the PNGs, grid.png and captions.txt"
    )
    p.add_argument("--scale", type=int, default=4, help="upscale factor for grid.png (nearest)")
    p.add_argument("--device", default="cpu")


@command("sample", add_sample_args)
def run_sample(args: argparse.Namespace) -> None:
    import torch

    from .data import pil_to_tensor, save_grid
    from .pipeline import DALLEPipeline

    pipe = DALLEPipeline.from_pretrained(args.model, device=args.device)
    result = pipe(
        args.prompt,
        num_images=args.num_images,
        seed=args.seed,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        cond_scale=args.cond_scale,
        progress=True,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, prompt, seed) in enumerate(zip(result.images, result.prompts, result.seeds)):
        name = f"{i // args.num_images:02d}_{i % args.num_images:02d}.png"
        image.save(out / name)
        lines.append(f"{name}\tseed={seed}\t{prompt}")
    size = pipe.vae.cfg.image_size
    save_grid(
        torch.stack([pil_to_tensor(im, size) for im in result.images]),
        out / "grid.png",
        nrow=args.num_images,
        scale=args.scale,
    )
    rows = [f"row {r + 1}: {p}" for r, p in enumerate(args.prompt)]
    (out / "captions.txt").write_text("\n".join(rows + [""] + lines) + "\n")
    print(f"wrote {len(result.images)} images and grid.png to {out}")


# --- data --------------------------------------------------------------------------------


def add_data_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True)
    shapes = sub.add_parser("shapes", help="write the built-in synthetic shapes dataset")
    shapes.add_argument("out")
    shapes.add_argument("--count", type=int, default=4000)
    shapes.add_argument("--image-size", type=int, default=32)
    shapes.add_argument("--max-shapes", type=int, default=1, choices=(1, 2))
    shapes.add_argument("--seed", type=int, default=0)


@command("data", add_data_args)
def run_data(args: argparse.Namespace) -> None:
    from .data import make_shapes_dataset

    if args.data_command == "shapes":
        path = make_shapes_dataset(
            args.out, args.count, args.image_size, args.seed, args.max_shapes
        )
        print(f"wrote {args.count} captioned images to {path}")


# --- entry point -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalle1", description="DALL-E 1: train, sample, edit.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _) in COMMANDS.items():
        add_args(
            sub.add_parser(name, help=(COMMANDS[name][1].__doc__ or name).strip().splitlines()[0])
        )
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
        COMMANDS[args.command][1](args)
    except USER_ERRORS as err:
        print(f"dalle1 {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
