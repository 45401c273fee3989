"""One architecture family per module; `build_model` picks the module by the config's family."""
from __future__ import annotations

import torch

from ..config import ModelConfig


def build_model(cfg: ModelConfig, weights: dict[str, torch.Tensor]):
    if cfg.family == "gemma":
        from .gemma import GemmaModel
        return GemmaModel(cfg, weights)
    from .llama import LlamaModel
    return LlamaModel(cfg, weights)
