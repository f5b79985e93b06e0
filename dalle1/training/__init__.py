"""Training with Lightning: ``fit(config)`` trains the stage ``train.stage`` names.

In import order: ``resilience`` (atomic checkpoints, exact resume, NaN guard,
Ctrl-C), ``systems`` (one LightningModule per stage), ``datamodule`` (the data of
each stage), ``watch`` (held-out figures, sample grids and curves during a run;
what the model folder keeps of it), ``fit`` (the trainer and the three stages).
Nothing here imports the inference pipeline.
"""

from .fit import fit
from .resilience import TrainingInterrupted

__all__ = ["TrainingInterrupted", "fit"]
