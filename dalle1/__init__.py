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

# How long an idle OpenMP thread busy-waits for the next parallel region before it
# sleeps. GNU OpenMP's default (300,000 spins, milliseconds) steals the cores from
# everything else on a busy machine (measured: 60 dVAE steps took 3-4x longer); never
# spinning (OMP_WAIT_POLICY=PASSIVE) makes every small operation wake its threads from
# sleep, 10-17% slower per training step on idle cores. 10,000 spins (about a tenth of a
# millisecond) keeps the second thread awake across the gaps between the operations of
# a training or decode step: on idle cores the demo's transformer step is ~10% faster
# than with 1,000 spins, training with the sparse masks 1.58x faster than dense instead
# of 1.45x, and cached sampling of 4 rows or more uses both cores (~20% faster,
# dalle1.decoding.decode_threads); beside two busy processes the transformer step is
# as fast as with 1,000 and a dVAE step about 20% slower (README, "Threads"). The
# setting is read once, when torch loads its OpenMP runtime, so it is made here, before
# anything imports torch, unless the user chose a policy or a spin count. A process
# that imported torch before dalle1 keeps whatever it had.
if "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
    os.environ["GOMP_SPINCOUNT"] = "10000"

from .config import Config, ConfigError, load_config  # noqa: E402
from .pipeline import DALLEOutput, DALLEPipeline  # noqa: E402

__all__ = ["Config", "ConfigError", "DALLEOutput", "DALLEPipeline", "load_config"]
__version__ = "0.1.0"
