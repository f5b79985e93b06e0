"""Throughput in the training log: stream tokens per second and model FLOPs utilisation.

``tokens_per_s`` counts stream positions (``L + N`` per sample: 1280 at the paper's shape)
over all ranks; ``mfu`` is the model FLOPs those tokens cost
(:func:`dalle1.planning.train_flops_per_token`, the same count ``dalle1 plan`` prints)
divided by what the devices could do at their peak (``train.peak_flops`` per device, or
the datasheet figure of an A100 / H100 / H200, or a matmul measured at the start of the
run on any other device, the CPU included). Both are averaged over the last
``train.log_every`` batches and land in ``metrics.csv`` with the loss.
"""

from __future__ import annotations

import sys
import time
from collections import deque

import lightning as L

from ..planning import device_peak_flops, train_flops_per_token


class ThroughputCallback(L.Callback):
    """Logs ``tokens_per_s``, ``mfu`` and ``peak_flops`` for the transformer stage."""

    def __init__(self, peak_flops: float = 0.0, window: int = 10):
        self.peak_flops, self.window = peak_flops, max(1, window)
        self.flops_per_token = self.stream = 0.0
        self.times: deque[float] = deque(maxlen=self.window + 1)
        self.tokens: deque[int] = deque(maxlen=self.window)

    def on_fit_start(self, trainer, pl_module) -> None:
        model = pl_module.dalle  # built by now (configure_model comes first)
        self.flops_per_token = train_flops_per_token(model)
        self.stream = model.shape.text_len + model.shape.num_codes
        source = "train.peak_flops"
        if not self.peak_flops:
            precision = str(trainer.precision)
            self.peak_flops, source = device_peak_flops(trainer.strategy.root_device, precision)
        if trainer.is_global_zero:
            print(
                f"dalle1: MFU against {self.peak_flops:.3g} FLOP/s per device ({source}); "
                f"{self.flops_per_token:.4g} FLOP per training token",
                file=sys.stderr,
            )

    def on_train_start(self, trainer, pl_module) -> None:
        self.times.clear()
        self.tokens.clear()
        self.times.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter())
        self.tokens.append(len(batch[1]) * self.stream * trainer.world_size)
        elapsed = self.times[-1] - self.times[0]
        if elapsed <= 0:
            return
        rate = sum(self.tokens) / elapsed
        mfu = rate * self.flops_per_token / (self.peak_flops * trainer.world_size)
        pl_module.log_dict(
            {"tokens_per_s": rate, "mfu": mfu, "peak_flops": self.peak_flops},
            on_step=True,
            on_epoch=False,
        )
