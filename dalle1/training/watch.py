"""What a training run shows while it trains, and what the model folder keeps of it.

- :class:`ValidationReport` prints the held-out figures of every validation pass
  (``train.val_every`` steps) as one line above the progress bar and redraws
  ``out_dir/loss_curves.png`` from the run's ``logs/metrics.csv``;
- :class:`SampleGrids` writes a grid of samples every ``train.sample_every`` steps
  of the transformer stage: the same held-out captions (one row each) and the same
  seeds every time, so ``out_dir/pictures/samples_*.png`` show the model learning;
- :func:`plot_history` draws a CSV log's losses, held-out figures and learning rate
  with matplotlib;
- :func:`keep_in_model_folder` copies what ``dalle1 explain`` and the UI show into
  the model folder (``examples/``: a few held-out images with their captions;
  ``history/``: each stage's log and curves), so the folder works from anywhere.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from tqdm.auto import tqdm

from ..data.captions import read_captions
from ..files import atomic_write, read_csv_log
from ..images import load_image, save_grid, tensor_to_pil
from ..sampling import SamplingOptions, sample_codes
from ..text import TextTokenizer
from ..vae import DiscreteVAE

EXAMPLES = "examples"  # model/examples/0000.png + 0000.txt: held-out images and captions
HISTORY = "history"  # model/history/<stage>.csv + <stage>_loss.png: the training logs


def bits(nats: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in nats -> bits."""
    return nats / math.log(2)


# --- held-out figures during the run --------------------------------------------------------


def validation_line(step: int, metrics: dict[str, float]) -> str:
    """'step 200 held-out: val_loss 1.234, val_image_bits 2.11' from the logged val_* metrics."""
    shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
    return f"step {step} held-out: {shown}"


class ValidationReport(L.Callback):
    """One printed line per validation pass; loss curves redrawn next to the log."""

    def __init__(self, out: Path, title: str):
        self.out, self.title = Path(out), title
        self.lines: list[str] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        if not metrics:
            return
        line = validation_line(trainer.global_step, metrics)
        self.lines.append(line)
        tqdm.write(line)  # above the progress bar, which redraws below it
        log = self.out / "logs" / "metrics.csv"
        if trainer.logger is not None:
            trainer.logger.save()  # flush the CSV so the curves include this pass
        if log.exists():
            plot_history(log, self.out / "loss_curves.png", self.title)


# --- sample grids during transformer training -----------------------------------------------


class SampleGrids(L.Callback):
    """Every ``every`` steps: one row of samples per caption, the same seeds each time.

    Writes ``pictures/samples_STEP.png`` (and ``pictures/captions.txt`` once). The
    transformer samples in eval mode under ``options`` and goes back to training mode;
    the draws come from their own generators, so training's random stream is untouched.
    """

    def __init__(
        self,
        out: Path,
        every: int,
        captions: list[str],
        tokenizer: TextTokenizer,
        vae: DiscreteVAE,
        per_caption: int = 4,
        options: SamplingOptions = SamplingOptions(),
        seed: int = 0,
    ):
        self.out, self.every = Path(out) / "pictures", every
        self.captions, self.tokenizer, self.vae = captions, tokenizer, vae
        self.per_caption, self.options, self.seed = per_caption, options, seed
        self.written: list[Path] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == 0 or step % self.every:
            return
        if self.written and self.written[-1].stem.endswith(f"{step:07d}"):
            return  # accumulated batches: one grid per optimizer step
        self.written.append(self.draw(pl_module.dalle, step))

    @torch.no_grad()
    def draw(self, dalle, step: int) -> Path:
        device = next(dalle.parameters()).device
        rows = [c for c in self.captions for _ in range(self.per_caption)]
        text = self.tokenizer.encode(rows).to(device)
        gens = [
            torch.Generator(device).manual_seed(self.seed + i % self.per_caption)
            for i in range(len(rows))
        ]
        was_training = dalle.training
        dalle.eval()
        try:
            codes = sample_codes(
                dalle,
                text,
                **asdict(self.options),
                null_text=self.tokenizer.pad_row().to(device),
                generators=gens,
            )
        finally:
            dalle.train(was_training)
        vae_device = next(self.vae.parameters()).device
        images = self.vae.decode(codes.to(vae_device))
        self.out.mkdir(parents=True, exist_ok=True)
        notes = self.out / "captions.txt"
        if not notes.exists():
            lines = [f"row {r + 1}: {c}" for r, c in enumerate(self.captions)]
            notes.write_text("\n".join(lines) + "\n")
        return save_grid(
            images, self.out / f"samples_{step:07d}.png", nrow=self.per_caption, scale=2
        )


# --- loss curves ------------------------------------------------------------------------------

TRAIN_CURVES = ("loss", "text_loss", "image_loss", "recon_loss", "aux_loss")


def plot_history(log: str | Path, png: str | Path, title: str) -> Path | None:
    """Draw the losses (and held-out ``val_*`` figures) of a CSV log against the step, with
    the learning rate on a second axis; None when the log holds no loss yet."""
    series = read_csv_log(log)
    train = {k: v for k, v in series.items() if k in TRAIN_CURVES}
    held = {k: v for k, v in series.items() if k.startswith("val_")}
    if not train and not held:
        return None
    import matplotlib  # only training draws curves; imported here to keep imports light

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, points in train.items():
        ax.plot(*zip(*points), label=key, linewidth=1.2)
    for key, points in held.items():
        ax.plot(*zip(*points), "o--", label=f"{key} (held-out)", markersize=3, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats) / held-out figure")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    lr = series.get("lr")
    if lr:
        twin = ax.twinx()
        twin.plot(*zip(*lr), color="grey", linewidth=0.8, alpha=0.6, label="lr")
        twin.set_ylabel("learning rate")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(png, lambda fh: fig.savefig(fh, format="png"))
    plt.close(fig)
    return png


# --- what the model folder keeps -------------------------------------------------------------


def write_examples(folder: Path, pairs: list, image_size: int, count: int = 32) -> int:
    """``folder/examples``: the first ``count`` held-out images (at the model's size, PNG)
    with their first caption line; what ``dalle1 explain`` and the UI show."""
    target = folder / EXAMPLES
    target.mkdir(parents=True, exist_ok=True)
    written = 0
    for image_path, caption_path in pairs:
        if written >= count:
            break
        try:
            image = load_image(image_path, image_size)
            captions = read_captions(caption_path)
        except (OSError, ValueError):
            continue  # unreadable files are counted by the training data report
        tensor_to_pil(image).save(target / f"{written:04d}.png")
        (target / f"{written:04d}.txt").write_text((captions or [""])[0] + "\n")
        written += 1
    return written


def keep_in_model_folder(
    folder: Path,
    out: Path,
    stage: str,
    examples: list | None = None,
    image_size: int = 0,
    inherit: Path | None = None,
) -> None:
    """Copy this run's log (``history/<stage>.csv``, curves ``history/<stage>_loss.png``,
    held-out figures ``history/<stage>.json``),
    the history of the model folder it builds on (``inherit``, e.g. the VAE's), and held-out
    ``examples`` into ``folder``: nothing in it then refers to the training folder."""
    history = folder / HISTORY
    history.mkdir(parents=True, exist_ok=True)
    if inherit is not None and (inherit / HISTORY).is_dir():
        for item in (inherit / HISTORY).iterdir():
            if not (history / item.name).exists():
                shutil.copy2(item, history / item.name)
    log = out / "logs" / "metrics.csv"
    if log.exists():
        shutil.copy2(log, history / f"{stage}.csv")
        plot_history(log, history / f"{stage}_loss.png", f"stage {stage}: training loss")
    if (out / "metrics.json").exists():  # the run's held-out figures, beside its log
        shutil.copy2(out / "metrics.json", history / f"{stage}.json")
    if examples:
        write_examples(folder, examples, image_size)
    elif inherit is not None and (inherit / EXAMPLES).is_dir() and not (folder / EXAMPLES).exists():
        shutil.copytree(inherit / EXAMPLES, folder / EXAMPLES)
