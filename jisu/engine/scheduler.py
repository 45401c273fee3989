"""Continuous batching: which requests run in the next model step, and how many of their tokens.

Every step has a token budget (`max_step_tokens`). Decoding requests come first (one token each),
then prompts still being prefilled, then new requests from the queue, each taking at most what is
left of the budget (chunked prefill), so a long prompt never stalls the decodes. New requests join
between steps. When the KV pool runs out of blocks for a decode, the most recently admitted
request is preempted by recompute: its blocks go back to the pool and it is requeued at the front
with its generated tokens appended to what must be recomputed (its full blocks usually come back
from the prefix cache). Finished, aborted and failed requests free their blocks at once."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .batch import StepBatch
from .kv_cache import PagedKVCache
from .request import Request, RequestOutput, Status, TokenLogprob


@dataclass
class ScheduledChunk:
    """One request's share of a step: positions [start, start + num_tokens) of `req.tokens`."""
    req: Request
    start: int
    num_tokens: int
    sample: bool                    # the chunk ends the known tokens: sample the next one
    prompt_positions: list[int]     # positions whose logits give prompt-token log-probs
    draft: list[int] = field(default_factory=list)  # speculative tokens after the known ones (counted
    #                                                 in num_tokens), each verified by its own row

    @property
    def logit_positions(self) -> list[int]:
        """Absolute positions whose logits the step must return, in row order."""
        if not self.sample:
            return self.prompt_positions
        end = self.start + self.num_tokens
        return self.prompt_positions + list(range(end - 1 - len(self.draft), end))

    @property
    def token_ids(self) -> list[int]:
        known = self.req.tokens[self.start:self.start + self.num_tokens - len(self.draft)]
        return known + self.draft if self.draft else known


@dataclass
class ScheduledBatch:
    chunks: list[ScheduledChunk] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.chunks)

    def to_step(self) -> StepBatch:
        """The runner's view: the chunks' tokens back to back, their positions and block tables."""
        if len(self.chunks) == 1:  # one sequence (a decode token or a prompt chunk): no flattening
            c = self.chunks[0]
            rows = c.logit_positions
            return StepBatch(c.token_ids, [c.num_tokens], [c.start],
                             [c.req.seq.block_table], [p - c.start for p in rows] if c.start else rows, [len(c.draft)])
        tokens, rows, off = [], [], 0
        for c in self.chunks:
            tokens += c.token_ids
            rows += [off + p - c.start for p in c.logit_positions]
            off += c.num_tokens
        return StepBatch(tokens, [c.num_tokens for c in self.chunks], [c.start for c in self.chunks],
                         [c.req.seq.block_table for c in self.chunks], rows, [len(c.draft) for c in self.chunks])


@dataclass
class SampleResult:
    """What the sampler decided for one chunk."""
    token_id: int | None = None                 # None: nothing sampled (mid-prefill chunk)
    logprob: TokenLogprob | None = None         # of the sampled token, when asked for
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    error: str | None = None                    # this request failed; the others go on
    accepted: list[int] = field(default_factory=list)   # verified draft tokens, emitted before token_id
    accepted_logprobs: list[TokenLogprob | None] = field(default_factory=list)


class Scheduler:
    def __init__(self, kv: PagedKVCache, *, max_num_seqs: int = 64, max_step_tokens: int = 64,
                 prefix_caching: bool = True, max_context: int | None = None):
        if max_num_seqs < 1 or max_step_tokens < 1:
            raise ValueError("max_num_seqs and max_step_tokens must be >= 1")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_step_tokens = max_step_tokens
        self.prefix_caching = prefix_caching
        self.max_context = max_context
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_prefix_hit_tokens = 0

    # --- queue --------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_blocks_used(self) -> int:
        return self.kv.pool.num_blocks - self.kv.num_free_blocks

    def abort(self, req: Request, reason: str = "abort", error: str | None = None) -> RequestOutput | None:
        """Finish a request that is queued or running now; its blocks return to the pool."""
        if req.finished:
            return None
        if req in self.running:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        return self._finish(req, reason, error)

    def _finish(self, req: Request, reason: str, error: str | None = None) -> RequestOutput:
        self.kv.free(req.seq)
        req.num_computed = 0
        req.status = Status.FINISHED
        req.finish_reason, req.error = reason, error
        req.finish_time = time.monotonic()
        tail = req.flush_text() if reason in ("stop", "length") else ""
        return req.make_output([], tail, [] if req.logprobs is not None else None)

    def _preempt(self, req: Request) -> None:
        """Recompute later: blocks back to the pool, generated tokens stay part of the sequence."""
        self.kv.free(req.seq)
        req.num_computed = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # --- one step -----------------------------------------------------------------------------
    def _chunk(self, req: Request, n: int) -> ScheduledChunk:
        start = req.num_computed
        end = start + n
        return ScheduledChunk(req, start, n, sample=end == len(req.tokens) and not req.scoring_only,
                              prompt_positions=req.prompt_logprob_positions(start, end))

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        self._budget = self.max_step_tokens
        preempted = self.num_preemptions
        # 1. decodes (one token each), oldest first; out of blocks -> preempt the newest
        i = 0
        while i < len(self.running) and self._budget > 0:
            req = self.running[i]
            if req.num_remaining == 1 and req.prefill_done:
                if not self._make_room(req, batch):
                    break                   # it was the newest: everything after it is gone too
                self._add(batch, req, 1)
            i += 1
        # 2. prompts being prefilled (or recomputed), in chunks that fit the budget and the pool
        i = 0
        while i < len(self.running) and self._budget > 0:
            req = self.running[i]
            i += 1
            if (req.num_remaining == 1 and req.prefill_done) or req.num_remaining == 0 or any(
                    c.req is req for c in batch.chunks):  # (0: a beam waiting for the rest of its group)
                continue
            if not self._make_room(req, batch):
                break
            self._add(batch, req, min(req.num_remaining, self._budget, self._fits(req)))
        # 3. new (or preempted) requests, first come first served, while their whole remaining
        #    prompt fits in the free blocks; none in a step that had to preempt
        while (self.waiting and self._budget > 0 and len(self.running) < self.max_num_seqs
               and self.num_preemptions == preempted):
            req = self.waiting[0]
            if self.prefix_caching and req.prompt_logprobs is None and not req.seq.block_table:
                hit = self.kv.match_prefix(req.seq, req.tokens)
                req.num_computed = hit
                if req.num_preemptions == 0:
                    req.num_cached = min(hit, req.num_prompt)
            fits = self._fits(req)
            if fits < req.num_remaining and (self.running or fits <= 0):
                self.kv.free(req.seq)       # no room yet: give matched blocks back, keep waiting
                req.num_computed = 0
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            if req.num_computed and req.num_preemptions == 0:
                self.num_prefix_hit_tokens += req.num_computed
            self._add(batch, req, min(req.num_remaining, self._budget, fits))
        return batch

    def _add(self, batch: ScheduledBatch, req: Request, n: int) -> None:
        self.kv.reserve(req.seq, n)
        batch.chunks.append(self._chunk(req, n))
        self._budget -= n

    def _make_room(self, req: Request, batch: ScheduledBatch) -> bool:
        """Preempt the newest running requests until `req` has room for one more position.
        False when `req` itself had to go (it was the newest)."""
        while self._fits(req) <= 0:
            victim = self.running.pop()
            for c in batch.chunks:
                if c.req is victim:         # scheduled earlier in this step: take it back out
                    batch.chunks.remove(c)
                    self._budget += c.num_tokens
                    break
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _fits(self, req: Request) -> int:
        """How many more positions the free blocks can take for this request."""
        return self.kv.room(req.seq)

    def update(self, batch: ScheduledBatch, results: list[SampleResult]) -> list[RequestOutput]:
        """Apply a step's results: record tokens, detect stops, finish and free. Returns updates."""
        outputs = []
        now = time.monotonic()
        for chunk, res in zip(batch.chunks, results):
            req = chunk.req
            if req.finished:
                continue
            req.num_computed = chunk.start + chunk.num_tokens - len(chunk.draft) + len(res.accepted)
            if chunk.draft:                 # rejected drafts: their K/V roll back
                self.kv.truncate(req.seq, req.num_computed)
            if res.error is not None:
                self.running.remove(req)
                outputs.append(self._finish(req, "error", res.error))
                continue
            if self.prefix_caching:
                self.kv.commit_prefix(req.seq, req.tokens)
            req.prompt_lp.extend(res.prompt_logprobs)
            if req.scoring_only and req.prefill_done:
                self.running.remove(req)
                outputs.append(self._finish(req, "length"))
                continue
            if res.token_id is None:
                if req.prompt_logprobs is not None and len(req.prompt_lp) >= req.num_prompt and not req.prompt_lp_sent:
                    outputs.append(req.make_output([], "", None))
                continue
            if req.first_token_time is None:
                req.first_token_time = now
            tokens, text, reason = [], "", None
            lps = None if req.logprobs is None else []
            all_lps = res.accepted_logprobs + [res.logprob]
            for j, token in enumerate(res.accepted + [res.token_id]):
                if token in req.stop_ids:
                    reason = "stop"
                    break
                piece, stopped = req.append_token(token)
                tokens.append(token)
                text += piece
                if lps is not None:
                    lps.append(all_lps[j])
                if stopped:
                    reason = "stop"
                elif len(req.output_ids) >= req.max_new_tokens or (
                        self.max_context is not None and len(req.tokens) >= self.max_context):
                    reason = "length"
                if reason is not None:
                    break
            if reason is None:
                outputs.append(req.make_output(tokens, text, lps))
            else:
                self.running.remove(req)
                last = self._finish(req, reason)
                last.token_ids, last.text, last.logprobs = tokens, text + last.text, lps
                outputs.append(last)
        return outputs

    def fail(self, batch: ScheduledBatch, error: str) -> list[RequestOutput]:
        """The whole step failed (the model raised): finish every request in it with an error."""
        outputs = []
        for chunk in batch.chunks:
            out = self.abort(chunk.req, "error", error)
            if out is not None:
                outputs.append(out)
        return outputs
