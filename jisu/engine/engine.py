"""The serving engine: many requests, one model, continuous batching over a paged KV cache.

    engine = Engine.from_llm(llm)                 # or Engine(model, tokenizer, eos_ids=...)
    rid = engine.add_request(prompt_ids, SamplingParams(temperature=0, max_tokens=32),
                             callback=on_output)   # RequestOutput deltas, from the engine thread
    engine.start()                                # the step loop in one background thread
    engine.abort(rid)                             # blocks go back to the pool before the next step

or without a thread: `engine.generate([...])` / `while engine.has_work(): engine.step()`.

One step is `batch = scheduler.schedule(); logits = runner.run(batch);
scheduler.update(batch, sampler(batch, logits))`.

Batch invariance: a request's tokens do not depend on what it is batched with, how its prompt
was chunked, whether it was preempted and recomputed, or found in the prefix cache. With
`jisu.load`'s default native forward step (kernels/native_model.py) the whole step is one call
whose per-token results are independent of the other tokens. On the reference model path, every
linear of a step runs on the native kernel (`jisu.kernels.ops.linear`: row results independent of
the number of rows up to `ops.F32_NATIVE_MAX_M`, which is why the step budget defaults to it
there) and `InvariantPagedBatch` computes attention one query row at a time with the native
decode kernel. PyTorch's own paths are not invariant: `F.linear`'s result for a row changes
with M (1 vs >1 rows differ by ~3e-5 on this CPU) and SDPA's changes with the query/key lengths
(~2e-7); without the native module (or for soft-capped / sliding-window attention on the
reference path) the engine falls back to them, and batched greedy outputs can then differ from
one-at-a-time ones in rare near-ties.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
import traceback
import uuid
from collections import deque
from typing import Sequence

import torch

from ..config import SamplingParams
from ..errors import JisuError
from ..kernels import _native, ops
from .kv_cache import PagedBatch, PagedKVCache
from .request import OutputCallback, Request, RequestOutput, Status, TokenLogprob
from .sampler import sample_token
from .scheduler import SampleResult, ScheduledBatch, Scheduler

log = logging.getLogger("jisu.engine")


class EngineError(JisuError):
    """A request the engine cannot take (bad ids, longer than the context or the KV pool)."""


class QueueFull(EngineError):
    """More requests are waiting than the engine accepts; try again later."""


# ----------------------------------------------------------------------------- the model step
class InvariantPagedBatch(PagedBatch):
    """PagedBatch whose attention is computed one query row at a time by the native decode
    kernel: bit-identical results however the rows are chunked or batched."""

    def attend(self, layer, q, k, v, scale, softcap, window):
        K = _native.K
        if K is None or softcap is not None or window is not None or q.dtype is not torch.float32:
            return super().attend(layer, q, k, v, scale, softcap, window)
        kv = self.kv
        hkv, d, bs = kv.cfg.num_kv_heads, kv.cfg.head_dim, kv.block_size
        h = q.shape[1]
        qr = q[0].transpose(0, 1).contiguous()                  # [T, H, D]
        out = torch.empty_like(qr)
        row_bytes = h * d * 4
        off = 0
        for seq, start, n, (blocks, offsets), table in zip(self.seqs, self.starts, self.q_lens, self._slots,
                                                           self._tables):
            kv.write(layer, blocks, offsets, k[0, :, off:off + n].transpose(0, 1), v[0, :, off:off + n].transpose(0, 1))
            nb = -(-(start + n) // bs)
            # [Hkv, nb * bs, D], contiguous (the gather copies)
            kc = kv.k[layer][table[:nb]].transpose(0, 1).reshape(hkv, nb * bs, d).float()
            vc = kv.v[layer][table[:nb]].transpose(0, 1).reshape(hkv, nb * bs, d).float()
            qp, op = qr.data_ptr() + off * row_bytes, out.data_ptr() + off * row_bytes
            for i in range(n):
                K.attn_decode(qp + i * row_bytes, kc.data_ptr(), vc.data_ptr(), op + i * row_bytes,
                              h, hkv, d, start + i + 1, nb * bs, float(scale))
            off += n
        return out.transpose(0, 1)[None]                        # [1, H, T, D]


class ModelRunner:
    """Flattens a scheduled batch into one forward pass and returns the logits rows it needs."""

    def __init__(self, model, kv: PagedKVCache):
        self.model = model
        self.kv = kv

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        flat, rows, off = [], [], 0
        for c in batch.chunks:
            flat.extend(c.req.tokens[c.start:c.start + c.num_tokens])
            rows.extend(off + p - c.start for p in c.logit_positions)
            off += c.num_tokens
        pb = InvariantPagedBatch(self.kv, [c.req.seq for c in batch.chunks], [c.start for c in batch.chunks],
                                 [c.num_tokens for c in batch.chunks])
        if not rows:
            self.model.forward(torch.tensor([flat]), pb, logits_index=torch.tensor([len(flat) - 1]))
            return torch.empty(0, self.model.cfg.vocab_size)
        return self.model.forward(torch.tensor([flat]), pb, logits_index=torch.tensor(rows))[0]


class Sampler:
    """Per-request sampling from a step's logits rows: each request with its own options,
    generator and penalty counts; a failure in one request is reported for that request only."""

    def __call__(self, batch: ScheduledBatch, logits: torch.Tensor) -> list[SampleResult]:
        results, off = [], 0
        for c in batch.chunks:
            n = len(c.logit_positions)
            rows = logits[off:off + n]
            off += n
            try:
                results.append(self.sample_one(c, rows))
            except Exception as e:  # noqa: BLE001 - isolate the request
                log.error("sampling failed for request %s: %s", c.req.id, traceback.format_exc())
                results.append(SampleResult(error=f"{type(e).__name__}: {e}"))
        return results

    def sample_one(self, chunk, rows: torch.Tensor) -> SampleResult:
        req = chunk.req
        res = SampleResult()
        if chunk.prompt_positions:
            lsm = torch.log_softmax(rows[:len(chunk.prompt_positions)].float(), dim=-1)
            targets = torch.tensor([req.tokens[p + 1] for p in chunk.prompt_positions])
            chosen = lsm.gather(1, targets[:, None])[:, 0].tolist()
            tops = _topk(lsm, req.prompt_logprobs)
            res.prompt_logprobs = [TokenLogprob(int(t), lp, top) for t, lp, top in zip(targets.tolist(), chosen, tops)]
        if chunk.sample:
            row = rows[-1]
            token = sample_token(row, req.params, req.generator, req.counts, req.prompt_seen)
            res.token_id = token
            if req.logprobs is not None:
                lsm = torch.log_softmax(row.float(), dim=-1)
                res.logprob = TokenLogprob(token, float(lsm[token]), _topk(lsm[None], req.logprobs)[0])
        return res


def _topk(lsm: torch.Tensor, n: int | None) -> list[list[tuple[int, float]]]:
    if not n:
        return [[] for _ in range(lsm.shape[0])]
    vals, idx = torch.topk(lsm, min(n, lsm.shape[-1]), dim=-1)
    return [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]


# ----------------------------------------------------------------------------- the engine
def default_step_tokens(model) -> int:
    """The per-step token budget: 256 for the native forward step (batch invariant at any size);
    on the reference path, at most ops.F32_NATIVE_MAX_M rows so every linear stays on the native
    kernel whose rows do not depend on M."""
    from ..kernels.native_model import NativeLlama

    if isinstance(model, NativeLlama) or not ops.native_available():
        return 256
    return ops.F32_NATIVE_MAX_M


KV_DTYPES = {"f32": torch.float32, "float32": torch.float32, "f16": torch.float16, "float16": torch.float16}


def resolve_kv_dtype(model, kv_dtype: torch.dtype | str | None) -> torch.dtype:
    """The KV cache dtype: as given ('f16' / 'f32' / a torch dtype), or for None / 'auto' the
    model's own preference (the native step: fp16 for quantized weights unless `--precise`), else
    fp32."""
    if kv_dtype is None or kv_dtype == "auto":
        return getattr(model, "kv_dtype", torch.float32)
    if isinstance(kv_dtype, str):
        if kv_dtype not in KV_DTYPES:
            raise EngineError(f"unknown KV cache dtype {kv_dtype!r}: use auto, f16 or f32")
        return KV_DTYPES[kv_dtype]
    if kv_dtype not in (torch.float32, torch.float16):
        raise EngineError(f"the KV cache holds float32 or float16, not {kv_dtype}")
    return kv_dtype


class Engine:
    def __init__(self, model, tokenizer=None, *, eos_ids: Sequence[int] = (), max_context: int | None = None,
                 kv_memory_mb: float | None = None, num_blocks: int | None = None, block_size: int = 16,
                 max_num_seqs: int = 64, max_step_tokens: int | None = None, max_queue: int = 1024,
                 prefix_caching: bool = True, kv_dtype: torch.dtype | str | None = None):
        cfg = model.cfg
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = tuple(eos_ids)
        self.max_context = max_context or cfg.max_position
        self.vocab_size = cfg.vocab_size
        self.kv_dtype = resolve_kv_dtype(model, kv_dtype)
        if num_blocks is None:
            mb = 256 if kv_memory_mb is None else kv_memory_mb
            self.kv = PagedKVCache.for_memory(cfg, int(mb * 2**20), block_size, dtype=self.kv_dtype)
        else:
            self.kv = PagedKVCache(cfg, num_blocks, block_size, dtype=self.kv_dtype)
        if max_step_tokens is None:
            max_step_tokens = default_step_tokens(model)
        self.scheduler = Scheduler(self.kv, max_num_seqs=max_num_seqs, max_step_tokens=max_step_tokens,
                                   prefix_caching=prefix_caching, max_context=self.max_context)
        self.runner = ModelRunner(model, self.kv)
        self.sampler = Sampler()
        self.max_queue = max_queue
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
        return cls(llm.model, llm.tokenizer, eos_ids=llm.eos_ids, max_context=llm.config.max_position, **kw)

    # --- requests (any thread) -----------------------------------------------------------------
    def check_request(self, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
        """Raise EngineError unless the engine could ever run this request."""
        n = len(prompt_ids)
        if n == 0:
            raise EngineError("the prompt is empty")
        bad = next((t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise EngineError(f"prompt token id {bad!r} is outside the vocabulary [0, {self.vocab_size})")
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
                      callback=callback, vocab_size=self.vocab_size)
        with self._cv:
            if self.num_unfinished >= self.max_queue:
                raise QueueFull(f"{self.num_unfinished} requests in flight (limit {self.max_queue})")
            self._inbox.append(req)
            self._cv.notify()
        return rid

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
        with self._cv:
            new, self._inbox = list(self._inbox), deque()
            aborts, self._aborts = list(self._aborts), deque()
        for req in new:
            self._requests[req.id] = req
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
        batch = self.scheduler.schedule()
        if batch:
            t0 = time.perf_counter()
            try:
                logits = self.runner.run(batch)
            except Exception as e:  # noqa: BLE001 - the step failed for every request in it
                log.error("model step failed: %s", traceback.format_exc())
                outputs += self.scheduler.fail(batch, f"{type(e).__name__}: {e}")
            else:
                outputs += self.scheduler.update(batch, self.sampler(batch, logits))
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

    # --- introspection -----------------------------------------------------------------------------
    def stats(self) -> dict:
        s = self.scheduler
        return {"waiting": len(s.waiting) + len(self._inbox), "running": len(s.running),
                "kv_blocks_used": s.num_blocks_used, "kv_blocks_total": self.kv.pool.num_blocks,
                "kv_block_size": self.kv.block_size, "preemptions": s.num_preemptions,
                "prefix_hit_tokens": s.num_prefix_hit_tokens, "steps": self.num_steps,
                "finished": self.num_finished, "errors": self.num_errors}


__all__ = ["Engine", "EngineError", "QueueFull", "ModelRunner", "Sampler", "InvariantPagedBatch",
           "RequestOutput", "TokenLogprob", "Status"]
