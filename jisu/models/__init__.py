"""One architecture family per module; `build_model` picks the module by the config's family."""
from __future__ import annotations

import torch

from ..config import ModelConfig


def model_class(cfg: ModelConfig):
    """The model class of the config's family."""
    if cfg.family == "gemma":
        from .gemma import GemmaModel
        return GemmaModel
    from .llama import LlamaModel
    return LlamaModel


def build_model(cfg: ModelConfig, weights: dict[str, torch.Tensor]):
    return model_class(cfg)(cfg, weights)
