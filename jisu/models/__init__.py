"""The architectures jisu runs: one module per architecture family (llama.py, gemma.py) declares
its names, config parsing, GGUF tensor names, load transforms and model class; `ARCHS` maps every
name to its module (docs/adding-an-architecture.md)."""
from __future__ import annotations

import torch

from ..config import ARCHS, ModelConfig
from ..errors import JisuError
from . import common, gemma, llama


def names(module) -> set[str]:
    """Every name a module answers to: HF model_types, GGUF architectures, ModelConfig.arch values."""
    return {*module.HF_TYPES, *module.HF_TYPES.values(), *module.GGUF_ARCHS}


def register(module) -> None:
    """Add an architecture module to the registry (ARCHS, shared with jisu.config)."""
    for name in names(module):
        if ARCHS.get(name, module) is not module:
            raise JisuError(f"architecture {name!r} is already registered by {ARCHS[name].__name__}")
    for name in names(module):
        ARCHS[name] = module


register(llama)
register(gemma)


def hf_types() -> list[str]:
    return sorted(n for n, m in ARCHS.items() if n in m.HF_TYPES)


def gguf_archs() -> list[str]:
    return sorted(n for n, m in ARCHS.items() if n in m.GGUF_ARCHS)


def build_model(cfg: ModelConfig, weights: dict[str, torch.Tensor]):
    return ARCHS[cfg.arch].build(cfg, weights)


def model_form(cfg: ModelConfig, weights: dict) -> dict:
    """A new dict over the same tensors, in the form the models compute with (Gemma: 1 + norm)."""
    return common.model_form(weights, ARCHS[cfg.arch].NORM_OFFSET)


def source_form(cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """Inverse of model_form for one tensor: the form held in memory and written to artifacts."""
    offset = ARCHS[cfg.arch].NORM_OFFSET
    return t - offset if offset and name.endswith("norm.weight") else t
