"""Training with Lightning: ``fit(config)`` trains the stage ``train.stage`` names.

In import order: ``resilience`` (atomic checkpoints, exact resume, NaN guard,
Ctrl-C), ``sharding`` (the transformer built on the meta device, sharded per layer
with FSDP2 for ``train.strategy: fsdp``), ``precision`` (what ``train.precision: auto``
trains in), ``systems`` (one LightningModule per
stage), ``datamodule`` (the data of each stage), ``throughput`` (tokens/s and MFU in
the log), ``watch`` (held-out figures, sample grids and curves during a run; what the
model folder keeps of it), ``fit`` (the trainer and the three stages). Nothing here
imports the inference pipeline.
"""

from .fit import fit
from .resilience import TrainingInterrupted

__all__ = ["TrainingInterrupted", "fit"]
