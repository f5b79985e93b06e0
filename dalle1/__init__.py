"""dalle1: OpenAI's DALL-E 1, reimplemented.

Reading order for a learner, which is also the import order (a module imports
only modules before it; tests/test_layers.py checks it):

* ground floor: files (atomic writes, safe reads), config, images (pixels in and out);
* the paper: text -> vae -> masks -> transformer -> sampling -> clip -> editing
  -> rerank;
* data/ (captioned images in any format), then the assembly: checkpoint, codes,
  evaluation, pipeline;
* training/ (Lightning), apps/ (eval, synth, explain, ui), and cli on top.
"""

import os
import sys

# OpenMP threads that busy-wait between parallel regions steal the cores from everything
# else on a shared or busy machine (measured: 60 dVAE steps took 3-4x longer with
# GNU OpenMP's default, active waiting). The policy is read once, when torch loads its
# OpenMP runtime, so it is set here, before anything imports torch, unless the user set
# it. A process that imported torch before dalle1 keeps whatever it had.
if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from .config import Config, ConfigError, load_config  # noqa: E402
from .pipeline import DALLEOutput, DALLEPipeline  # noqa: E402

__all__ = ["Config", "ConfigError", "DALLEOutput", "DALLEPipeline", "load_config"]
__version__ = "0.1.0"
