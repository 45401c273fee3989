"""The serving engine: many requests, one model, continuous batching over a paged KV cache.

    engine = Engine.from_llm(llm)                 # or Engine(runner, tokenizer, EngineConfig(...))
    rid = engine.add_request(prompt_ids, SamplingParams(temperature=0, max_tokens=32),
                             callback=on_output)   # RequestOutput deltas, from the engine thread
    engine.start()                                # the step loop in one background thread
    engine.abort(rid)                             # blocks go back to the pool before the next step

or without a thread: `engine.generate([...])`, `engine.stream(prompt_ids)` (one request, its
outputs yielded as the steps run), or `while engine.has_work(): engine.step()`.

One step is `batch = scheduler.schedule(); logits = runner.run(batch.to_step(), kv);
scheduler.update(batch, sampler(batch, logits))`; with speculation (speculator.py) decode chunks
first get draft tokens, each verified by its own logits row, and rejected ones roll back.

Batch invariance: a request's tokens do not depend on what it is batched with, how its prompt
was chunked, whether it was preempted and recomputed, or found in the prefix cache. Both runners
(runner.py) compute each token's row independently of the other rows in the step, up to their
`max_step_tokens`. PyTorch's own paths are not invariant (`F.linear`'s result for a row changes
with M, SDPA's with the query/key lengths); without the native module, or for soft-capped /
sliding-window attention on the reference path, the engine falls back to them, and batched greedy
outputs can then differ from one-at-a-time ones in rare near-ties.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
import traceback
import uuid
from collections import deque
from typing import Iterator, Sequence

import torch

from ..config import SamplingParams
from .config import EngineConfig, EngineError, QueueFull
from .beam import ForkGroup, SearchGroups, attach_beam_group
from .kv_cache import PagedKVCache
from .request import OutputCallback, Request, RequestOutput, Status, TokenLogprob
from .sampling import Sampler
from .scheduler import Scheduler
from .speculator import SpecState, Speculator

log = logging.getLogger("jisu.engine")


class Engine:
    """Requests in, RequestOutputs out; `runner` (runner.py) computes the steps, `config` sizes
    the KV pool and the steps."""

    def __init__(self, runner, tokenizer=None, config: EngineConfig | None = None, draft=None):
        config = config or EngineConfig()
        cfg = runner.cfg
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = config.eos_ids
        self.max_context = config.max_context or cfg.max_position
        self.vocab_size = cfg.vocab_size
        self.kv_dtype = config.resolve_kv_dtype(runner.kv_dtype)
        if config.num_blocks is None:
            mb = 256 if config.kv_memory_mb is None else config.kv_memory_mb
            self.kv = PagedKVCache.for_memory(cfg, int(mb * 2**20), config.block_size, dtype=self.kv_dtype,
                                              resident=config.kv_resident)
        else:
            self.kv = PagedKVCache(cfg, config.num_blocks, config.block_size, dtype=self.kv_dtype,
                                   resident=config.kv_resident)
        self.scheduler = Scheduler(self.kv, max_num_seqs=config.max_num_seqs,
                                   max_step_tokens=config.max_step_tokens or runner.max_step_tokens,
                                   prefix_caching=config.prefix_caching, max_context=self.max_context)
        self.sampler = Sampler()
        # speculation (speculator.py): `draft` is a speculative.DraftModelProposer for mode "draft"
        self.speculator = Speculator(self, draft, config.max_draft) if config.max_draft else None
        if self.speculator is not None and config.speculative != "off":
            self.speculator.cost  # profile the step now (once per runner), not inside the first decode
        self.search = SearchGroups(self.scheduler, self.kv, tokenizer)   # beam search and best-of-n forks
        self.max_queue = config.max_queue
        self._requests: dict[str, Request] = {}      # live requests (engine thread's view)
        self._inbox: deque[Request] = deque()        # added by any thread, taken by step()
        self._aborts: deque[str] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._ids = itertools.count()
        # counters (read by the server's metrics)
        self.num_steps = 0
        self.num_finished = 0
        self.num_errors = 0
        self.step_time_s = 0.0

    @classmethod
    def from_llm(cls, llm, **kw) -> "Engine":
        """An engine over `llm`'s step runner (built once per LLM); `kw` are EngineConfig fields."""
        draft = kw.pop("draft", None)
        return cls(getattr(llm, "step_runner", llm.runner), llm.tokenizer, EngineConfig(eos_ids=llm.eos_ids, max_context=llm.config.max_position,
                                                           **kw), draft=draft)

    # --- requests (any thread) -----------------------------------------------------------------
    def check_request(self, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
        """Raise EngineError unless the engine could ever run this request."""
        n = len(prompt_ids)
        if n == 0:
            raise EngineError("the prompt is empty")
        bad = next((t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise EngineError(f"prompt token ids must lie in the vocabulary [0, {self.vocab_size}): {bad!r} does not")
        if max_new_tokens < 0:
            raise EngineError(f"max_tokens must be >= 0 (got {max_new_tokens})")
        if n + max_new_tokens > self.max_context:
            raise EngineError(f"the prompt of {n} tokens plus max_tokens {max_new_tokens} exceeds the model's "
                              f"context of {self.max_context} tokens")
        need = -(-(n + max_new_tokens) // self.kv.block_size)
        if need > self.kv.pool.num_blocks:
            raise EngineError(f"the prompt of {n} tokens plus max_tokens {max_new_tokens} needs {need} KV blocks; "
                              f"the cache holds {self.kv.pool.num_blocks} (raise --kv-memory)")

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
                    max_new_tokens: int | None = None, logprobs: int | None = None,
                    prompt_logprobs: int | None = None, request_id: str | None = None,
                    callback: OutputCallback | None = None) -> str:
        """Queue a request; returns its id. `max_new_tokens` overrides params.max_tokens (0 = only
        score the prompt, with `prompt_logprobs`). Outputs go to `callback` (on the engine thread)
        and are returned by step()."""
        params = params or SamplingParams()
        prompt_ids = [int(t) for t in prompt_ids]
        max_new = params.max_tokens if max_new_tokens is None else max_new_tokens
        self.check_request(prompt_ids, max_new)
        if max_new == 0 and prompt_logprobs is None:
            raise EngineError("max_tokens 0 only scores the prompt: ask for prompt_logprobs")
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_ids))
        rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        req = Request(rid, prompt_ids, params, max_new_tokens=max_new, logprobs=logprobs,
                      prompt_logprobs=prompt_logprobs, stop_ids=stop_ids, tokenizer=self.tokenizer,
                      callback=callback, vocab_size=self.vocab_size, constraint=self._constraint(params))
        req.spec = self._spec_state(params)
        if params.is_beam_search:
            attach_beam_group(req, self.kv, self.max_context)
        with self._cv:
            if self.num_unfinished >= self.max_queue:
                raise QueueFull(f"{self.num_unfinished} requests in flight (limit {self.max_queue})")
            self._inbox.append(req)
            self._cv.notify()
        return rid

    def _spec_state(self, params: SamplingParams) -> SpecState | None:
        """The request's speculation: none when off; `auto` drafts for greedy requests only (a
        sampled request's tokens are then drawn by the plain sampler's generator)."""
        mode = params.speculative or self.config.speculative
        if mode == "draft" and (self.speculator is None or self.speculator.draft is None):
            raise EngineError("speculative=draft needs an engine with a draft model (jisu run --speculative draft:MODEL)")
        if (self.speculator is None or mode == "off" or (mode == "auto" and not params.is_greedy)
                or params.is_beam_search        # beams rank whole candidate sets: no drafts
                or params.json_schema is not None or params.grammar is not None):   # drafts ignore the mask
            return None
        return SpecState(mode, params, self.speculator.prior(mode))

    def add_forks(self, prompt_ids: Sequence[int], params: Sequence[SamplingParams], **kw) -> list[str]:
        """Queue len(params) requests on one prompt that compute it once: the first prefills it and
        the others fork its KV blocks when it samples its first token (best_of / n). `kw` as in
        add_request (without request_id); with prompt_logprobs each request computes its own."""
        with self._cv:  # (re-entrant) the engine thread takes them all in one go
            ids = []
            try:
                for p in params:
                    ids.append(self.add_request(prompt_ids, p, **kw))
            except BaseException:
                for _ in ids:
                    self._inbox.pop()
                raise
            reqs = list(self._inbox)[len(self._inbox) - len(ids):]
            if len(reqs) > 1 and kw.get("prompt_logprobs") is None and not any(r.group for r in reqs):
                ForkGroup(reqs[0], reqs[1:])
        return ids

    def _constraint(self, params: SamplingParams):
        """The token constraint of a request with a json_schema or grammar (engine/structured.py)."""
        if params.json_schema is None and params.grammar is None:
            return None
        from . import structured

        if self.tokenizer is None:
            raise EngineError("structured output needs the engine's tokenizer")
        if params.is_beam_search:
            raise EngineError("beam search cannot be combined with json_schema / grammar")
        if params.ignore_eos:    # a complete document allows only EOS next
            raise EngineError("ignore_eos cannot be combined with json_schema / grammar")
        try:
            grammar = structured.as_grammar(params.json_schema, params.grammar)
            return structured.Constraint(grammar, self.tokenizer, self.vocab_size, self.eos_ids)
        except structured.GrammarError as e:
            raise EngineError(str(e)) from None

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks return to the pool before the next step (at once when no
        step is running). Unknown or finished ids are ignored."""
        with self._cv:
            self._aborts.append(request_id)
            self._cv.notify()

    @property
    def num_unfinished(self) -> int:
        return len(self._inbox) + len(self.scheduler.waiting) + len(self.scheduler.running)

    def has_work(self) -> bool:
        return bool(self._inbox or self._aborts or self.scheduler.has_work())

    # --- the step (engine thread) ---------------------------------------------------------------
    def _take_inbox(self) -> list[RequestOutput]:
        outputs = []
        if not (self._inbox or self._aborts):  # seen at the next step if another thread adds now
            return outputs
        with self._cv:
            new, self._inbox = list(self._inbox), deque()
            aborts, self._aborts = list(self._aborts), deque()
        for req in new:
            self._requests[req.id] = req
            if self.search.admit(req):
                self.scheduler.add(req)
        for rid in aborts:
            req = self._requests.get(rid)
            if req is not None:
                out = self.scheduler.abort(req)
                if out is not None:
                    outputs.append(out)
        return outputs

    def step(self) -> list[RequestOutput]:
        """Admit and abort, run one batched model step, sample, emit the updates."""
        outputs = self._take_inbox()
        outputs += self.search.reap()
        batch = self.scheduler.schedule()
        if batch:
            t0 = time.perf_counter()
            spec = self.speculator
            try:
                if spec is not None:
                    spec.extend(batch)
                t1 = time.perf_counter()
                logits = self.runner.run(batch.to_step(), self.kv)
                t2 = time.perf_counter()
            except Exception as e:  # noqa: BLE001 - the step failed for every request in it
                log.error("model step failed: %s", traceback.format_exc())
                outputs += self.scheduler.fail(batch, f"{type(e).__name__}: {e}")
            else:
                batch, logits, done = self.search.take(batch, logits)
                outputs += done
                if batch and spec is None:
                    outputs += self.scheduler.update(batch, self.sampler(batch, logits))
                elif batch:
                    results = spec.sample(batch, logits, self.sampler)
                    outputs += self.scheduler.update(batch, results)
                    spec.observe(batch, results, t2 - t1)
            outputs += self.search.reap()
            self.step_time_s += time.perf_counter() - t0
            self.num_steps += 1
        self._dispatch(outputs)
        return outputs

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            req = self._requests.get(out.request_id)
            if req is None:
                continue
            if out.finished:
                del self._requests[out.request_id]
                self.num_finished += 1
                self.num_errors += out.finish_reason == "error"
            if req.callback is not None:
                try:
                    req.callback(out)
                except Exception:  # noqa: BLE001 - a consumer's bug must not stop the engine
                    log.error("output callback failed for %s: %s", out.request_id, traceback.format_exc())

    # --- the background thread ------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="jisu-engine", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stop and not self.has_work():
                        self._cv.wait(timeout=1.0)
                    if self._stop:
                        break
                try:
                    self.step()
                except Exception:  # noqa: BLE001 - keep serving
                    log.error("engine step crashed: %s", traceback.format_exc())
                    time.sleep(0.01)
            # shutting down: everything still in flight is aborted (callbacks see "abort")
            outputs = self._take_inbox()
            for req in list(self.scheduler.running) + list(self.scheduler.waiting):
                out = self.scheduler.abort(req)
                if out is not None:
                    outputs.append(out)
            outputs += self.search.reap()
            self._dispatch(outputs)

    def shutdown(self, timeout: float | None = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- synchronous use --------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 **kw) -> list[dict]:
        """Run prompts to completion on the calling thread (no background thread may be running).
        Returns per prompt: {"token_ids", "text", "finish_reason", "logprobs", "prompt_logprobs", "error"}."""
        if self.running:
            raise RuntimeError("generate() runs the engine itself; the background loop is running")
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        results: dict[str, dict] = {}

        def collect(out: RequestOutput) -> None:
            r = results[out.request_id]
            r["token_ids"] += out.token_ids
            r["text"] += out.text
            if out.logprobs:
                r["logprobs"] += out.logprobs
            if out.prompt_logprobs is not None:
                r["prompt_logprobs"] = out.prompt_logprobs
            if out.finished:
                r["finish_reason"], r["error"] = out.finish_reason, out.error
                if out.sequences is not None:
                    r["sequences"] = out.sequences

        ids = []
        for prompt, p in zip(prompts, plist):
            rid = self.add_request(prompt, p, callback=collect, **kw)
            results[rid] = {"token_ids": [], "text": "", "finish_reason": None, "logprobs": [],
                            "prompt_logprobs": None, "error": None}
            ids.append(rid)
        with torch.inference_mode():
            while self.has_work():
                self.step()
        return [results[i] for i in ids]

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
               **kw) -> Iterator[RequestOutput]:
        """Run one request on the calling thread, yielding its outputs as the steps produce them
        (no background thread may be running). Closing the iterator early aborts the request."""
        if self.running:
            raise RuntimeError("stream() runs the engine itself; the background loop is running")
        outputs: deque[RequestOutput] = deque()
        rid = self.add_request(prompt_ids, params, callback=outputs.append, **kw)
        done = False
        try:
            while not done and self.has_work():
                with torch.inference_mode():  # around the step only: not over the caller's code
                    self.step()
                while outputs:
                    out = outputs.popleft()
                    done = out.finished
                    yield out
        finally:
            if not done:
                self.abort(rid)
                self._dispatch(self._take_inbox())

    # --- introspection -----------------------------------------------------------------------------
    def stats(self) -> dict:
        s = self.scheduler
        return {"waiting": len(s.waiting) + len(self._inbox), "running": len(s.running),
                "kv_blocks_used": s.num_blocks_used, "kv_blocks_total": self.kv.pool.num_blocks,
                "kv_block_size": self.kv.block_size, "preemptions": s.num_preemptions,
                "prefix_hit_tokens": s.num_prefix_hit_tokens, "steps": self.num_steps,
                "finished": self.num_finished, "errors": self.num_errors,
                **(self.speculator.stats() if self.speculator is not None else {})}


__all__ = ["Engine", "EngineConfig", "EngineError", "QueueFull", "RequestOutput", "TokenLogprob", "Status"]
