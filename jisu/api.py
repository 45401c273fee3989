"""The Python API: `jisu.load(model)` -> LLM with generate / chat / stream."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from .config import ModelConfig, SamplingParams
from .errors import JisuError
from .io.sources import ModelSource, load_weights, resolve
from .io.tokenizer import Tokenizer
from .models import build_model

if TYPE_CHECKING:  # the engine imports jisu.kernels.ops, whose import checks the kernels
    from .engine.engine import Engine
    from .engine.runner import Runner


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str                  # "stop" (EOS or stop string) | "length"
    prefill_s: float = 0.0              # seconds to process the prompt
    decode_s: float = 0.0               # seconds from the first generated token to the last
    decode_steps: int = 0               # forward passes after the prefill (an EOS token costs one too)
    decode_tokens: int = 0              # tokens they produced (more than the steps when drafts were accepted)
    beams: list | None = None           # beam search: the returned beams (engine/beam.BeamSequence), best first

    @property
    def prefill_tok_s(self) -> float:
        return len(self.prompt_token_ids) / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        steps = max(self.decode_steps, self.decode_tokens)
        return steps / self.decode_s if steps > 0 and self.decode_s else 0.0

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "prompt_token_ids": self.prompt_token_ids,
                "finish_reason": self.finish_reason,
                "timings": {"prefill_s": self.prefill_s, "decode_s": self.decode_s,
                            "prompt_tokens": len(self.prompt_token_ids), "generated_tokens": len(self.token_ids),
                            "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s,
                            "decode_steps": self.decode_steps},
                **({"beams": [vars(b) for b in self.beams]} if self.beams is not None else {})}


@dataclass
class StreamState:
    """Filled in while a stream runs; complete when the iterator is exhausted."""
    completion: Completion | None = None
    token_ids: list[int] = field(default_factory=list)


class LLM:
    """A loaded model with its tokenizer and runner. Prompts are strings (or token ids); chat takes
    messages. Generation runs through one Engine on the calling thread, built on first use with a
    KV pool for the request and rebuilt only when a request needs more."""

    def __init__(self, model, tokenizer: Tokenizer, source: ModelSource, runner: Runner | None = None, *,
                 faithful: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        if runner is None:
            from .engine.runner import TorchRunner

            runner = TorchRunner(model)
        self.runner = runner
        self.faithful = faithful
        self._step_runner = None
        self._engine: Engine | None = None
        self.draft = None   # a speculative.DraftModelProposer for requests with speculative="draft"

    @property
    def step_runner(self) -> Runner:
        """The runner generation steps go through: `runner` itself with `faithful` False (`--fast`),
        else engine/faithful.FaithfulRunner around it (precise activations in every step, greedy
        tokens as the fp32 reference's on the same weights). `runner` stays the plain one, for
        code that wants the kernels' process-wide setting as it is."""
        if not self.faithful:
            return self.runner
        if self._step_runner is None or self._step_runner.inner is not self.runner:
            from .engine.faithful import FaithfulRunner

            self._step_runner = FaithfulRunner(self.runner)
        return self._step_runner

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

    def engine_for(self, num_tokens: int) -> Engine:
        """The engine whose KV pool holds one sequence of `num_tokens` positions, in one block (the
        layout of a static cache: the attention reads one contiguous run per head), sized for the
        request, not for serving, so a single run's peak memory is that of its cache. Steps of
        runner.prefill_chunk tokens, as a prompt runs alone; no prefix caching, so each call
        computes its whole prompt. Rebuilt only when a request needs more."""
        from .engine.config import EngineConfig
        from .engine.engine import Engine

        e, runner = self._engine, self.step_runner
        step_tokens = runner.prefill_chunk or runner.max_step_tokens
        if (e is None or e.runner is not runner or e.kv.block_size < num_tokens or e.kv_dtype != runner.kv_dtype
                or e.scheduler.max_step_tokens != step_tokens
                or (e.speculator is not None and e.speculator.draft is not self.draft)):
            self._engine = None  # the old pool goes before the new one is built
            self._engine = Engine(runner, self.tokenizer, EngineConfig(
                eos_ids=self.eos_ids, max_context=self.config.max_position, num_blocks=1,
                block_size=max(1, num_tokens), max_num_seqs=1, max_step_tokens=step_tokens, prefix_caching=False,
                kv_resident=False), draft=self.draft)
        return self._engine

    def engine_stats(self) -> dict:
        """The generation engine's counters (speculation included); empty before the first request."""
        return self._engine.stats() if self._engine is not None else {}

    def beam_engine(self, num_prompt: int, max_new: int, num_beams: int) -> Engine:
        """The engine for one beam search: a paged pool (blocks of 16) that holds the prompt once and
        every beam's own tail, `num_beams` sequences per step. Rebuilt only when a request needs more."""
        from .engine.beam import beam_blocks_needed
        from .engine.config import EngineConfig
        from .engine.engine import Engine

        e, runner = self._engine, self.step_runner
        need = beam_blocks_needed(num_prompt, max_new, num_beams, 16)
        step_tokens = runner.prefill_chunk or runner.max_step_tokens
        if (e is None or e.runner is not runner or e.kv.block_size != 16 or e.kv.pool.num_blocks < need
                or e.kv_dtype != runner.kv_dtype or e.scheduler.max_step_tokens != step_tokens
                or e.scheduler.max_num_seqs < num_beams):
            self._engine = None
            self._engine = Engine(runner, self.tokenizer, EngineConfig(
                eos_ids=self.eos_ids, max_context=self.config.max_position, num_blocks=need, block_size=16,
                max_num_seqs=num_beams, max_step_tokens=step_tokens, prefix_caching=False, kv_resident=False))
        return self._engine

    def stream(self, prompt: str | Sequence[int] | list[dict], params: SamplingParams | None = None, *,
               state: StreamState | None = None, **options) -> Iterator[str]:
        """Yield text pieces as they are generated. A list of {role, content} dicts is a chat."""
        chat = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)
        return self._stream(self.encode_prompt(prompt, chat=chat), SamplingParams.build(params, **options),
                            state or StreamState())

    def _stream(self, prompt_ids: list[int], params: SamplingParams, state: StreamState) -> Iterator[str]:
        if params.is_beam_search:
            engine = self.beam_engine(len(prompt_ids), params.max_tokens, params.num_beams)
        else:
            engine = self.engine_for(len(prompt_ids) + params.max_tokens)
        text, finish, steps, decoded, beams = [], "length", -1, 0, None
        t0 = first = last = time.perf_counter()
        for out in engine.stream(prompt_ids, params):
            # the first output comes out of the prefill; each later one took a decode step
            last = time.perf_counter()
            if steps < 0:
                first = last
            else:
                decoded += max(1, len(out.token_ids))
            steps += 1
            if out.error is not None:
                raise JisuError(f"generation failed: {out.error}")
            state.token_ids += out.token_ids
            if out.text:
                text.append(out.text)
                yield out.text
            if out.finished:
                finish, beams = out.finish_reason, out.sequences
        if beams is not None:  # one output at the end: the prefill ended at the first ranking
            first, steps = last - (out.finish_time - out.first_token_time), len(beams[0].token_ids)
            decoded = steps
        state.completion = Completion("".join(text), state.token_ids, prompt_ids, finish, first - t0, last - first,
                                      max(steps, 0), decoded, beams)

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
         packed: bool | None = None, native: bool | None = None, precise: bool | None = None,
         fast: bool = False, isa: str | None = None) -> LLM:
    """Load MODEL (a GGUF file, an HF folder, a short name; None = the default model).

    packed: keep a GGUF's matrices quantized for the native kernels (Q8_0 / Q4_0 / Q4_1 repacked,
    every other type with a native kernel in the file's own bytes) and an HF folder's bf16 / f16
    matrices in the file (default: when jisu._kernels is built); False dequantizes every tensor to
    fp32 (the reference path).
    native: run the model through the native forward step, engine/native_runner.py
    (default: when supported); False: the reference model (engine/runner.TorchRunner).
    precise: True makes the packed kernels carry every int8 activation block's rounding residual
    (~15-bit activations: the output of the plain fp32 path on the same weights, greedy tokens
    included, at about half the prefill speed, and an fp32 KV cache); False restores plain int8
    blocks (the kernels' default, as llama.cpp; faithful generation still switches its own steps
    to precise activations). The setting is process-wide; None leaves it as it is.
    fast: generate with the kernels' process-wide setting as it is (plain int8 activation blocks
    unless `precise`). By default (False) the LLM is faithful: every generation step runs under
    precise activations with the fast mode's fp16 KV cache (engine/faithful.py), so greedy tokens
    are the fp32 reference's on the same weights; `precise=True` also keeps the KV cache in fp32
    (bit for bit the reference path's numbers).
    isa: run the kernels on this instruction set ("scalar", "avx2", "avx512", "neon", "best"; the
    environment's JISU_ISA does the same for a whole process); None leaves it as it is."""
    from .engine.runner import make_runner
    from .kernels import ops
    from .memory import loading_heap

    if threads:
        torch.set_num_threads(threads)
        ops.set_num_threads(threads)
    if fast and precise:
        raise JisuError("fast and precise exclude each other")
    if precise is not None:
        ops.set_act_refine(ops.PRECISE if precise else 0.0)
    if isa is not None:
        ops.force_isa(isa, "isa")
    source = resolve(model)
    t0 = time.perf_counter()
    if packed is None:
        packed = ops.native_available()
    with loading_heap():  # conversion temporaries do not add to the peak RSS
        cfg, weights, tokenizer = load_weights(source, progress=progress, packed=packed)
        net = build_model(cfg, weights)
        del weights
        runner = make_runner(net, native)
    llm = LLM(net, tokenizer, source, runner, faithful=not fast)
    llm.load_s = time.perf_counter() - t0
    return llm
