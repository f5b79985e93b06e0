"""dalle1: OpenAI's DALL-E 1, reimplemented.

Reading order for a learner: text -> vae -> masks -> transformer -> sampling
-> pipeline; then data -> training.
"""

from .config import Config, ConfigError, load_config
from .pipeline import DALLEOutput, DALLEPipeline

__all__ = ["Config", "ConfigError", "DALLEOutput", "DALLEPipeline", "load_config"]
__version__ = "0.1.0"
