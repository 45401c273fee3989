"""EngineConfig: the engine's settings in one dataclass, checked once when built; and the errors
the engine raises for requests and settings it cannot take."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import JisuError


class EngineError(JisuError):
    """A request the engine cannot take (bad ids, longer than the context or the KV pool)."""


class QueueFull(EngineError):
    """More requests are waiting than the engine accepts; try again later."""


@dataclass
class EngineConfig:
    eos_ids: Sequence[int] = ()           # token ids that end a sequence (unless ignore_eos)
    max_context: int | None = None        # longest sequence, prompt + output (None: the model's)
    kv_memory_mb: float | None = None     # KV pool size in MB (None: 256, unless num_blocks is given)
    num_blocks: int | None = None         # KV pool size in blocks (overrides kv_memory_mb)
    block_size: int = 16                  # positions per KV block
    max_num_seqs: int = 64                # sequences running at once
    max_step_tokens: int | None = None    # tokens per step (None: the runner's max_step_tokens)
    max_queue: int = 1024                 # requests in flight (waiting + running) before QueueFull
    prefix_caching: bool = True           # reuse the KV blocks of a prompt prefix seen before
    kv_dtype: torch.dtype | str | None = None  # "f16" / "f32" / a dtype; None or "auto": the runner's
    speculative: str = "auto"             # requests' default speculation: auto (n-gram, off when it does
    #                                       not pay) | ngram | draft (the engine's draft model) | off
    max_draft: int = 16                   # draft tokens per request and step, at most
    kv_resident: bool = True              # the whole pool resident from the start (a server's steady
    #                                       state: no page faults in the steps); False: pages become
    #                                       resident only where written (a single request's pool)

    def __post_init__(self):
        self.eos_ids = tuple(self.eos_ids)
        if self.max_num_seqs < 1 or (self.max_step_tokens is not None and self.max_step_tokens < 1):
            raise EngineError("max_num_seqs and max_step_tokens must be >= 1")
        if isinstance(self.kv_dtype, str) and self.kv_dtype != "auto" and self.kv_dtype not in KV_DTYPES:
            raise EngineError(f"unknown KV cache dtype {self.kv_dtype!r}: use auto, f16 or f32")
        if self.speculative not in ("auto", "ngram", "draft", "off"):
            raise EngineError(f"unknown speculative mode {self.speculative!r}: use auto, ngram, draft or off")
        if self.max_draft < 0:
            raise EngineError("max_draft must be >= 0")
        if isinstance(self.kv_dtype, torch.dtype) and self.kv_dtype not in (torch.float32, torch.float16):
            raise EngineError(f"the KV cache holds float32 or float16, not {self.kv_dtype}")

    def resolve_kv_dtype(self, preferred: torch.dtype) -> torch.dtype:
        """The KV cache dtype: as configured, or for None / 'auto' the runner's `preferred` one."""
        if self.kv_dtype is None or self.kv_dtype == "auto":
            return preferred
        return KV_DTYPES[self.kv_dtype] if isinstance(self.kv_dtype, str) else self.kv_dtype


KV_DTYPES = {"f32": torch.float32, "float32": torch.float32, "f16": torch.float16, "float16": torch.float16}
