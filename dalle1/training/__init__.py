"""Training with Lightning: ``fit(config)`` trains the stage ``train.stage`` names.

In import order: ``resilience`` (atomic checkpoints, exact resume, NaN guard),
``systems`` (one LightningModule per stage), ``datamodule`` (the data of each
stage), ``fit`` (the trainer and the three stages). Nothing here imports the
inference pipeline.
"""

from .fit import fit

__all__ = ["fit"]
