"""The architectures jisu runs: one module per architecture family (llama.py, gemma.py) declares
its names, config parsing, GGUF tensor names, load transforms and model class; the registry
(`archs()`) maps every name to its module (docs/adding-an-architecture.md)."""
from __future__ import annotations

import torch

from ..config import ModelConfig, archs, defer_archs
from ..errors import JisuError
from . import common


def names(module) -> set[str]:
    """Every name a module answers to: HF model_types, GGUF architectures, ModelConfig.arch values
    (ARCHS: names of an architecture no HF or GGUF file declares)."""
    return {*module.HF_TYPES, *module.HF_TYPES.values(), *module.GGUF_ARCHS, *getattr(module, "ARCHS", ())}


def register(module) -> None:
    """Add an architecture module to the registry (kept in jisu.config, which checks names)."""
    registry = archs()  # the built-in modules first, so that a clash with one is seen
    for name in names(module):
        if registry.get(name, module) is not module:
            raise JisuError(f"architecture {name!r} is already registered by {registry[name].__name__}")
    for name in names(module):
        registry[name] = module


def _register_builtins() -> None:
    from . import gemma, llama, lstm  # they load the kernels: on the registry's first use, not at `import jisu`

    register(llama)
    register(gemma)
    register(lstm)


defer_archs(_register_builtins)


def hf_types() -> list[str]:
    return sorted(n for n, m in archs().items() if n in m.HF_TYPES)


def gguf_archs() -> list[str]:
    return sorted(n for n, m in archs().items() if n in m.GGUF_ARCHS)


def model_class(cfg: ModelConfig):
    """The model class of the config's architecture."""
    return archs()[cfg.arch].MODEL


def build_model(cfg: ModelConfig, weights: dict[str, torch.Tensor]):
    return model_class(cfg)(cfg, weights)


def model_form(cfg: ModelConfig, weights: dict) -> dict:
    """A new dict over the same tensors, in the form the models compute with (Gemma: 1 + norm)."""
    return common.model_form(weights, archs()[cfg.arch].NORM_OFFSET)


def source_form(cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """Inverse of model_form for one tensor: the form held in memory and written to artifacts."""
    offset = archs()[cfg.arch].NORM_OFFSET
    return t - offset if offset and name.endswith("norm.weight") else t
