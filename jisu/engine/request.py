"""One request's state inside the serving engine, and the updates the engine hands back.

A `Request` owns everything that makes its output independent of the other requests it is
batched with: its sampling options, its own `torch.Generator` (seeded requests give the same
tokens alone or batched), its penalty counts, its incremental detokenizer and stop-string matcher,
and its view of the paged KV cache (`SeqBlocks`)."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..config import SamplingParams
from .kv_cache import SeqBlocks
from .sampler import make_generator, needs_counts
from .text import StopMatcher


class Status(enum.Enum):
    WAITING = "waiting"       # queued (new, or preempted and waiting to recompute)
    RUNNING = "running"       # holds KV blocks; prefilling or decoding
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """The log-probability of one token under the model's raw distribution (log-softmax of the
    logits, before penalties and temperature) and the `top` most likely alternatives."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """An incremental update for one request: what is new since the previous update."""
    request_id: str
    token_ids: list[int]                       # tokens generated in this update (EOS excluded)
    text: str                                  # text delta (stop strings and anything after them held back)
    logprobs: list[TokenLogprob] | None        # one per new token, when the request asked for them
    prompt_logprobs: list[TokenLogprob | None] | None = None   # once, on the first update (first is None)
    finished: bool = False
    finish_reason: str | None = None           # "stop" | "length" | "abort" | "error"
    error: str | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0              # so far, in total
    num_cached_tokens: int = 0                 # prompt tokens served from the prefix cache
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    sequences: list | None = None              # beam search: the returned beams (beam.BeamSequence), best first


OutputCallback = Callable[[RequestOutput], None]


class Request:
    """Engine-side state of one generation request."""

    def __init__(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams, *,
                 max_new_tokens: int | None = None, logprobs: int | None = None,
                 prompt_logprobs: int | None = None, stop_ids: Sequence[int] = (), tokenizer=None,
                 callback: OutputCallback | None = None, vocab_size: int | None = None,
                 constraint=None):
        self.id = request_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.max_new_tokens = params.max_tokens if max_new_tokens is None else max_new_tokens
        self.logprobs = logprobs                  # None: none; N >= 0: chosen token + top N
        self.prompt_logprobs = prompt_logprobs    # None: none; N >= 0: per prompt token + top N
        self.stop_ids = frozenset(stop_ids)
        self.callback = callback
        self.tokens: list[int] = list(self.prompt_ids)     # prompt + generated: what the KV must hold
        self.output_ids: list[int] = []
        self.seq = SeqBlocks()
        self.group = None                         # beam.BeamGroup / beam.ForkGroup it belongs to, if any
        self.num_computed = 0                     # leading positions of `tokens` whose K/V are cached
        self.num_cached = 0                       # prompt tokens reused from the prefix cache (first admission)
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.num_preemptions = 0
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.generator = None if params.is_greedy else make_generator(params.seed)
        self.constraint = constraint              # engine/structured.Constraint: masks this request's logits
        self.counts = self.prompt_seen = None
        if needs_counts(params):
            vocab = vocab_size or (max(self.prompt_ids) + 1)
            self.counts = torch.zeros(vocab)
            self.prompt_seen = torch.zeros(vocab, dtype=torch.bool)
            self.prompt_seen[torch.tensor(self.prompt_ids, dtype=torch.long)] = True
        # prompt log-probs: entry j is log p(prompt[j] | prompt[:j]); entry 0 is None
        self.prompt_lp: list[TokenLogprob | None] = [None] if prompt_logprobs is not None else []
        self.prompt_lp_sent = False
        # text
        self.tokenizer = tokenizer
        self.decoder = None
        self.stops = StopMatcher(params.stop)
        if tokenizer is not None:
            from ..io.tokenizer import StreamDecoder

            self.decoder = StreamDecoder(tokenizer, self.prompt_ids)
        self.text = ""                             # text emitted so far
        self.spec = None                           # speculation state (speculator.SpecState), if any

    # --- state -----------------------------------------------------------------------------
    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def num_remaining(self) -> int:
        """Positions still to run through the model before the next token can be sampled."""
        return len(self.tokens) - self.num_computed

    @property
    def prefill_done(self) -> bool:
        return self.num_computed >= self.num_prompt

    @property
    def scoring_only(self) -> bool:
        return self.max_new_tokens == 0

    def prompt_logprob_positions(self, start: int, end: int) -> list[int]:
        """Positions in [start, end) whose logits give a prompt token's log-prob not yet collected
        (position j predicts prompt token j + 1)."""
        if self.prompt_logprobs is None:
            return []
        first = max(start, len(self.prompt_lp) - 1)
        return list(range(first, min(end, self.num_prompt - 1)))

    # --- generated tokens -------------------------------------------------------------------
    def append_token(self, token_id: int) -> tuple[str, bool]:
        """Record a generated token: (text delta that is safe to emit, whether a stop string hit)."""
        self.output_ids.append(token_id)
        self.tokens.append(token_id)
        if self.counts is not None:
            self.counts[token_id] += 1
        if self.decoder is None:
            return "", False
        piece = self.stops.push(self.decoder.push(token_id))
        self.text += piece
        return piece, self.stops.stopped

    def flush_text(self) -> str:
        tail = self.stops.flush() if self.decoder is not None else ""
        self.text += tail
        return tail

    def make_output(self, token_ids: list[int], text: str, logprobs: list[TokenLogprob] | None) -> RequestOutput:
        prompt_lp = None
        if self.prompt_logprobs is not None and not self.prompt_lp_sent and (
                len(self.prompt_lp) >= self.num_prompt or self.finished):
            prompt_lp, self.prompt_lp_sent = self.prompt_lp, True
        return RequestOutput(self.id, token_ids, text, logprobs, prompt_lp, self.finished, self.finish_reason,
                             self.error, self.num_prompt, len(self.output_ids), self.num_cached,
                             self.arrival_time, self.first_token_time, self.finish_time)

    def __repr__(self) -> str:
        return (f"Request({self.id!r}, {self.status.value}, prompt={self.num_prompt}, out={len(self.output_ids)}, "
                f"computed={self.num_computed})")
