"""The Python API: `jisu.load(model)` -> LLM with generate / chat / stream."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .config import ModelConfig, SamplingParams
from .engine.generate import generate_tokens
from .engine.text import StopMatcher
from .io.sources import ModelSource, load_weights, resolve
from .io.tokenizer import StreamDecoder, Tokenizer
from .models import build_model


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str                  # "stop" (EOS or stop string) | "length"
    prefill_s: float = 0.0              # seconds to process the prompt
    decode_s: float = 0.0               # seconds from the first generated token to the last
    decode_steps: int = 0               # forward passes after the prefill (an EOS token costs one too)

    @property
    def prefill_tok_s(self) -> float:
        return len(self.prompt_token_ids) / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        steps = self.decode_steps
        return steps / self.decode_s if steps > 0 and self.decode_s else 0.0

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "prompt_token_ids": self.prompt_token_ids,
                "finish_reason": self.finish_reason,
                "timings": {"prefill_s": self.prefill_s, "decode_s": self.decode_s,
                            "prompt_tokens": len(self.prompt_token_ids), "generated_tokens": len(self.token_ids),
                            "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s}}


@dataclass
class StreamState:
    """Filled in while a stream runs; complete when the iterator is exhausted."""
    completion: Completion | None = None
    token_ids: list[int] = field(default_factory=list)


class LLM:
    """A loaded model with its tokenizer. Prompts are strings (or token ids); chat takes messages."""

    def __init__(self, model, tokenizer: Tokenizer, source: ModelSource):
        self.model = model
        self.tokenizer = tokenizer
        self.source = source

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(self.tokenizer.eos_ids + self.config.eos_token_ids))

    def encode_prompt(self, prompt: str | Sequence[int] | list[dict], *, chat: bool) -> list[int]:
        if chat:
            return self.tokenizer.encode_chat(prompt)  # type: ignore[arg-type]
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def stream(self, prompt: str | Sequence[int] | list[dict], params: SamplingParams | None = None, *,
               state: StreamState | None = None, **options) -> Iterator[str]:
        """Yield text pieces as they are generated. A list of {role, content} dicts is a chat."""
        chat = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)
        return self._stream(self.encode_prompt(prompt, chat=chat), SamplingParams.build(params, **options),
                            state or StreamState())

    def _stream(self, prompt_ids: list[int], params: SamplingParams, state: StreamState) -> Iterator[str]:
        decoder = StreamDecoder(self.tokenizer, prompt_ids)
        stops = StopMatcher(params.stop)
        text, finish, prefill_s, decode_s, steps = [], "length", 0.0, 0.0, -1
        for event in generate_tokens(self.model, prompt_ids, params, self.eos_ids, self.config.max_position):
            # the first token comes out of the prefill; each later one took a decode step
            prefill_s, decode_s, steps = event.prefill_s, event.elapsed_s, steps + 1
            if event.is_eos:
                finish = "stop"
                break
            state.token_ids.append(event.token_id)
            piece = stops.push(decoder.push(event.token_id))
            if piece:
                text.append(piece)
                yield piece
            if stops.stopped:
                finish = "stop"
                break
        tail = stops.flush()
        if tail:
            text.append(tail)
            yield tail
        state.completion = Completion("".join(text), state.token_ids, prompt_ids, finish, prefill_s, decode_s,
                                      max(steps, 0))

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None, **options) -> Completion:
        """Complete raw text (no chat template)."""
        state = StreamState()
        for _ in self._stream(self.encode_prompt(prompt, chat=False), SamplingParams.build(params, **options), state):
            pass
        return state.completion

    def chat(self, messages: list[dict], params: SamplingParams | None = None, **options) -> Completion:
        """Answer a conversation [{"role": "user", "content": ...}, ...] through the chat template."""
        state = StreamState()
        for _ in self._stream(self.encode_prompt(messages, chat=True), SamplingParams.build(params, **options), state):
            pass
        return state.completion


def load(model: str | os.PathLike | None = None, *, threads: int | None = None, progress: bool = False,
         packed: bool | None = None, native: bool | None = None, precise: bool | None = None) -> LLM:
    """Load MODEL (a GGUF file, an HF folder, a short name; None = the default model).

    packed: keep a GGUF's Q8_0 / Q4_0 / Q4_1 matrices quantized for the native kernels (default:
    when jisu._kernels is built); False dequantizes every tensor to fp32 (the reference path).
    native: run Llama-family models through the native forward step (default: when supported).
    precise: True makes the packed kernels carry every int8 activation block's rounding residual
    (~15-bit activations: the output of the plain fp32 path on the same weights, greedy tokens
    included, at about half the prefill speed); False restores plain int8 blocks (the default, as
    llama.cpp). The setting is process-wide; None leaves it as it is."""
    from .kernels import ops
    from .kernels.native_model import accelerate
    from .memory import loading_heap

    if threads:
        torch.set_num_threads(threads)
        ops.set_num_threads(threads)
    if precise is not None:
        ops.set_act_refine(ops.PRECISE if precise else 0.0)
    source = resolve(model)
    t0 = time.perf_counter()
    if packed is None:
        packed = ops.native_available()
    with loading_heap():  # conversion temporaries do not add to the peak RSS
        cfg, weights, tokenizer = load_weights(source, progress=progress, packed=packed)
        net = build_model(cfg, weights)
        del weights
        if native is not False:
            net = accelerate(net)
    llm = LLM(net, tokenizer, source)
    llm.load_s = time.perf_counter() - t0
    return llm
