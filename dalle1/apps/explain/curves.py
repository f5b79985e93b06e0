"""Training curves from a run's logs (paper section 2.2: 1/8 text loss, 7/8 image loss).

:func:`read_metrics` reads Lightning's CSV log (``logs/metrics.csv``): every loss
column, and any held-out column a validation loop logged (``val_…``).
:func:`read_held_out` reads the held-out figures a run wrote at its end
(``metrics.json``: bits per text token and per image code, or PSNR). The
picture plots the losses on a log axis against the optimizer step and marks the
held-out values at the last step, converted to the same unit (nats).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from matplotlib import ticker
from PIL import Image

from ...files import read_csv_log
from .figures import (
    IMAGE_COLOR,
    INK,
    PAD_COLOR,
    TOKEN_COLOR,
    axes_px,
    finish,
    hex_color,
    new_figure,
    title,
)

CURVE_COLORS = {
    "loss": INK,
    "text_loss": TOKEN_COLOR,
    "image_loss": IMAGE_COLOR,
    "recon_loss": (155, 89, 182),
    "aux_loss": PAD_COLOR,
}
CURVE_NAMES = {
    "loss": "loss (what is minimised)",
    "text_loss": "text CE (weight 1/8)",
    "image_loss": "image CE (weight 7/8)",
    "recon_loss": "reconstruction loss",
    "aux_loss": "quantizer loss (commit / β·KL)",
}
# held-out figures of metrics.json -> (the curve they belong to, factor to that curve's unit)
HELD_OUT = {
    "val_text_bits_per_token": ("text_loss", math.log(2)),
    "val_image_bits_per_token": ("image_loss", math.log(2)),
}
CURVES_SIZE = (900, 440)


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Lightning's CSVLogger file -> {column: [(step, value), …]} for the loss columns.

    A column counts when it is one of :data:`CURVE_COLORS` or a held-out column a
    validation loop logged under ``val_<name>`` with ``<name>`` one of them.
    """
    series = read_csv_log(path)
    wanted = set(CURVE_COLORS) | {f"val_{name}" for name in CURVE_COLORS}
    return {key: values for key, values in series.items() if key in wanted}


def read_held_out(path: str | Path | None) -> dict[str, float]:
    """The numbers of a run's ``metrics.json`` (empty when there is none)."""
    if path is None or not Path(path).is_file():
        return {}
    data = json.loads(Path(path).read_text())
    return {k: float(v) for k, v in data.items() if isinstance(v, int | float)}


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = np.cumsum(values[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def loss_curves_picture(
    series: dict[str, list[tuple[int, float]]],
    heading: str,
    lines: list[str] = (),
    held_out: dict[str, float] | None = None,
    unit: str = "nats",
) -> Image.Image:
    """Each logged loss against the optimizer step, log axis; held-out values as points.

    ``held_out`` is a run's ``metrics.json``: the figures of :data:`HELD_OUT` are drawn
    as stars on their curve at the last step; an ``mse`` is drawn on ``recon_loss``
    when ``unit`` is "MSE" (a VAE trained with the MSE loss).
    """
    if not series:
        raise ValueError("no loss column (loss, text_loss, image_loss, recon_loss) in the log")
    held_out = held_out or {}
    fig = new_figure(*CURVES_SIZE)
    top = title(fig, heading, list(lines))
    ax = axes_px(fig, (80, top + 8, CURVES_SIZE[0] - 290, CURVES_SIZE[1] - 50))
    positive = all(v > 0 for points in series.values() for _, v in points)
    last_step = max(s for points in series.values() for s, _ in points)
    for key, points in series.items():
        base = key[4:] if key.startswith("val_") else key
        color = hex_color(CURVE_COLORS[base])
        steps = np.array([s for s, _ in points])
        values = np.array([v for _, v in points])
        if key.startswith("val_"):
            ax.plot(
                steps,
                values,
                "o--",
                color=color,
                markersize=4,
                label=f"held-out {CURVE_NAMES[base]}",
            )
            continue
        window = max(1, len(values) // 40)
        if window > 1:
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(
            steps, running_mean(values, window), color=color, linewidth=1.8, label=CURVE_NAMES[key]
        )
    stars = [
        (
            curve,
            held_out[name] * factor,
            f"held-out: {held_out[name]:.3g} bits = {held_out[name] * factor:.3g} nats",
        )
        for name, (curve, factor) in HELD_OUT.items()
        if name in held_out
    ]
    if unit == "MSE" and "mse" in held_out:
        stars.append(("recon_loss", held_out["mse"], f"held-out MSE: {held_out['mse']:.2g}"))
    for curve, value, label in stars:
        if curve in series and (value > 0 or not positive):
            ax.plot(
                [last_step],
                [value],
                marker="*",
                markersize=12,
                linestyle="none",
                color=hex_color(CURVE_COLORS[curve]),
                markeredgecolor="black",
                label=label,
            )
    if positive:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(ticker.NullLocator())
        ax.set_ylabel(f"loss ({unit}, log scale)")
    else:
        ax.set_ylabel(f"loss ({unit}; linear: some values are ≤ 0)")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=8, integer=True))
    ax.set_xlabel("optimizer step")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return finish(fig, heading)


def vae_held_out_line(held_out: dict[str, float]) -> str:
    parts = []
    if "psnr" in held_out:
        parts.append(f"PSNR {held_out['psnr']:.1f} dB")
    if "mse" in held_out:
        parts.append(f"MSE {held_out['mse']:.2g}")
    if "usage" in held_out:
        parts.append(f"{100 * held_out['usage']:.0f}% of the codes used")
    return "held-out at the end of the run (metrics.json): " + ", ".join(parts) if parts else ""


def dalle_held_out_line(held_out: dict[str, float]) -> str:
    if "val_image_bits_per_token" not in held_out:
        return ""
    return (
        "held-out at the end of the run (metrics.json): "
        f"{held_out['val_image_bits_per_token']:.3g} bits per image code, "
        f"{held_out.get('val_text_bits_per_token', float('nan')):.3g} bits per text token (stars)"
    )
