"""The server's settings and the state its routes share (the model, the engine, the metrics)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..engine.engine import Engine
from .metrics import Metrics
from .protocol import MAX_BODY_BYTES, MAX_HEADER_BYTES


@dataclass
class ServerSettings:
    api_key: str | None = None                  # clients must send it as a Bearer token (None: no key)
    max_body_bytes: int = MAX_BODY_BYTES        # larger request bodies get 413
    max_header_bytes: int = MAX_HEADER_BYTES    # larger request heads get 431
    retry_after_s: int = 1                      # the Retry-After of a 429 (queue full) or 503 (draining)
    served_model_name: str | None = None        # the model id /v1/models reports (None: the file or folder name)
    poll_disconnect_s: float = 0.5              # how often a non-streaming request checks its client


@dataclass
class ServerState:
    llm: Any                            # the loaded model (its tokenizer and source)
    engine: Engine                      # the continuous-batching engine, stepping in its own thread
    settings: ServerSettings            # limits, API key, names
    metrics: Metrics                    # this server's Prometheus registry
    model_names: list[str]              # the names a request may use; the first is the one reported
    draining: bool = False              # shutting down: new API requests get 503
    inflight: int = 0                   # /v1 HTTP requests being served
    manage_engine: bool = True          # the app shuts the engine down with its lifespan
    token_text_cache: dict[int, str] = field(default_factory=dict)   # token id -> its text, for logprobs

    def token_text(self, token_id: int) -> str:
        s = self.token_text_cache.get(token_id)
        if s is None:
            s = self.llm.tokenizer.decode([token_id], skip_special=False)
            if len(self.token_text_cache) < 200_000:
                self.token_text_cache[token_id] = s
        return s
