"""jisu: compress, run, measure and serve language models fast."""
from .version import __version__
from .api import LLM, Completion, load
from .config import ModelConfig, SamplingParams
from . import compress  # noqa: E402  (jisu.compress.compress(model, out, recipe, ...))

__all__ = ["load", "LLM", "Completion", "SamplingParams", "ModelConfig", "compress", "__version__"]
