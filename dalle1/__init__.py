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

from .config import Config, ConfigError, load_config
from .pipeline import DALLEOutput, DALLEPipeline

__all__ = ["Config", "ConfigError", "DALLEOutput", "DALLEPipeline", "load_config"]
__version__ = "0.1.0"
