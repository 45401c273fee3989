"""jisu: compress, run, measure and serve language models fast."""
__version__ = "0.1.0"

from .api import LLM, Completion, load  # noqa: E402
from .config import ModelConfig, SamplingParams  # noqa: E402
from . import compress  # noqa: E402  (jisu.compress.compress(model, out, recipe, ...))

__all__ = ["load", "LLM", "Completion", "SamplingParams", "ModelConfig", "compress", "__version__"]
