"""Frozen dataclasses that cross module boundaries: the model's shape and the sampling options."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

from .errors import JisuError

# The architecture registry: every architecture name (HF `model_type`, GGUF `general.architecture`,
# ModelConfig.arch) -> the module of jisu.models that declares it. jisu.models fills it; it lives
# here so that ModelConfig can check a name without importing jisu.models (which imports this
# module). The built-in modules load the kernels, which `import jisu` must not do (a bad JISU_ISA
# is an error only where they load): jisu.models defers them, and `archs()` runs what is deferred.
_ARCHS: dict[str, Any] = {}
_DEFERRED: list[Callable[[], None]] = []


def defer_archs(load: Callable[[], None]) -> None:
    """Have `load` (which registers architectures) run on the registry's first use."""
    _DEFERRED.append(load)


def archs() -> dict[str, Any]:
    """The registry, with every deferred registration done."""
    while _DEFERRED:
        load = _DEFERRED.pop()
        try:
            load()
        except BaseException:
            _DEFERRED.append(load)  # the error again on the next use, not an empty registry
            raise
    return _ARCHS


@dataclass(frozen=True)
class ModelConfig:
    arch: str                      # a registered architecture: "llama" | "mistral" | "qwen2" | "qwen3" | "gemma2" | ...
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int                  # may differ from hidden_size // num_heads (Gemma, Qwen3)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # Llama 3 style {"rope_type": "llama3", "factor": ...}
    max_position: int = 4096
    tie_embeddings: bool = False
    attn_bias: bool = False        # Qwen2: bias on q/k/v projections
    qk_norm: bool = False          # Qwen3 / Gemma 3: RMSNorm on each q and k head
    hidden_act: str = "silu"       # "silu" | "gelu_tanh"
    # Gemma only
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer "sliding" | "full"; empty = all full
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    rope_local_theta: float | None = None  # Gemma 3: theta of the sliding layers
    embed_scale: float = 1.0       # Gemma multiplies embeddings by sqrt(hidden_size)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Per-layer shapes of a model whose layers differ (pruned layers); empty = every layer has the
    # uniform size above (intermediate_size is then the largest, num_heads / num_kv_heads too).
    intermediate_sizes: tuple[int, ...] = ()       # MLP width of each layer
    layer_heads: tuple[tuple[int, int], ...] = ()  # (query heads, KV heads) of each layer

    def __post_init__(self):
        if self.arch not in archs():
            raise JisuError(f"unknown architecture {self.arch!r} (supported: {', '.join(sorted(archs()))})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value > 1 << 24:
                raise JisuError(f"model config: {name}={value!r} is not a sane positive integer")
        if self.num_heads % self.num_kv_heads:
            raise JisuError(f"model config: {self.num_heads} heads not divisible by {self.num_kv_heads} KV heads")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise JisuError("model config: layer_types must name every layer")
        object.__setattr__(self, "intermediate_sizes", tuple(int(n) for n in self.intermediate_sizes))
        object.__setattr__(self, "layer_heads", tuple((int(q), int(kv)) for q, kv in self.layer_heads))
        for name in ("intermediate_sizes", "layer_heads"):
            if getattr(self, name) and len(getattr(self, name)) != self.num_layers:
                raise JisuError(f"model config: {name} must give every layer")
        if any(n <= 0 for n in self.intermediate_sizes) or any(q <= 0 or kv <= 0 or q % kv
                                                                for q, kv in self.layer_heads):
            raise JisuError("model config: per-layer sizes must be positive (query heads a multiple of KV heads)")

    @property
    def family(self) -> str:
        """The jisu.models module that declares this architecture ("llama", "gemma", ...)."""
        return archs()[self.arch].__name__.rpartition(".")[2]

    def mlp_width(self, layer: int) -> int:
        return self.intermediate_sizes[layer] if self.intermediate_sizes else self.intermediate_size

    def heads(self, layer: int) -> tuple[int, int]:
        """(query heads, KV heads) of a layer."""
        return self.layer_heads[layer] if self.layer_heads else (self.num_heads, self.num_kv_heads)

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding"


@dataclass(frozen=True)
class SamplingParams:
    """Decoding options; names follow the OpenAI API. temperature 0 means greedy."""
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0                 # 0 = off
    min_p: float = 0.0             # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # llama.cpp/HF style multiplicative penalty
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    speculative: str | None = None   # "auto" | "ngram" | "draft" | "off"; None: the engine's default
    # beam search (engine/beam.py, HF transformers' semantics); num_beams 1 = off
    num_beams: int = 1             # beams kept at each step
    length_penalty: float = 1.0    # a finished beam scores sum(log-probs) / generated_len ** length_penalty
    early_stopping: bool | str = False  # True: stop once num_beams beams finished; False: HF's heuristic; "never"
    num_return_sequences: int = 1  # the best finished beams returned (<= num_beams)
    # structured output (engine/structured.py): a JSON Schema (dict or JSON text; True = any JSON),
    # or a grammar (Lark text, or an engine.structured.Grammar); the tokens are constrained to it
    json_schema: Any = None
    grammar: Any = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        checks = [
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", _finite(self.temperature) and 0 <= self.temperature <= 100, "in [0, 100]"),
            ("top_p", _finite(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("min_p", _finite(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1]"),
            ("presence_penalty", _finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", _finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("repetition_penalty", _finite(self.repetition_penalty) and 0 < self.repetition_penalty <= 10, "in (0, 10]"),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
            ("speculative", self.speculative in (None, "auto", "ngram", "draft", "off"),
             "one of auto, ngram, draft, off"),
            ("num_beams", _int(self.num_beams) and 1 <= self.num_beams <= MAX_BEAMS, f"an integer in [1, {MAX_BEAMS}]"),
            ("length_penalty", _finite(self.length_penalty) and abs(self.length_penalty) <= 100, "in [-100, 100]"),
            ("early_stopping", isinstance(self.early_stopping, bool) or self.early_stopping == "never",
             "True, False or 'never'"),
            ("num_return_sequences", _int(self.num_return_sequences) and 1 <= self.num_return_sequences
             <= self.num_beams, "an integer in [1, num_beams]"),
            ("grammar", self.grammar is None or self.json_schema is None, "unset when json_schema is given"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise JisuError(f"sampling: {name}={getattr(self, name)!r} must be {what}")
        if self.num_beams > 1 and self.temperature != 0:
            raise JisuError(f"sampling: beam search is deterministic: set temperature=0 (got {self.temperature}); "
                            "sampled beam search is not supported")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def is_beam_search(self) -> bool:
        return self.num_beams > 1

    @classmethod
    def build(cls, params: "SamplingParams | None" = None, **overrides: Any) -> "SamplingParams":
        """Start from `params` (or the defaults) and apply keyword overrides, rejecting unknown names."""
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return replace(params or cls(), **overrides)


MAX_BEAMS = 32  # beam width limit (each beam is a sequence of the batch)


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


__all__ = ["ModelConfig", "SamplingParams", "archs"]
