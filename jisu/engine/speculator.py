"""Speculation inside continuous batching: a start-up cost model of a step by its rows, per-request
acceptance, the draft length that maximises expected tokens per second (0 = off, probed again
later), and the verification of each drafted chunk's k + 1 rows."""
from __future__ import annotations

import time
import weakref
from dataclasses import replace

import numpy as np
import torch

from .batch import StepBatch
from .kv_cache import PagedKVCache
from .request import TokenLogprob
from .sampler import sample_token
from .scheduler import SampleResult, ScheduledBatch
from .speculative import NgramProposer, keyed_uniform, rejection_sample, request_seed, target_probs


class CostModel:
    """Seconds of one step by its number of tokens (each with a logit row, as a verify step),
    measured at start-up on a scratch cache and refined by the steps the engine runs."""
    POINTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)

    def __init__(self, times: dict[int, float]):
        self.n = np.array(sorted(times), dtype=float)
        # a step never gets cheaper with more rows: noise in the profile must not say otherwise
        self.s = np.maximum.accumulate(np.array([times[k] for k in sorted(times)], dtype=float))
        self._table: list[float] = []        # t(n) for n < len(table), rebuilt after observations
        self._dirty = 0

    @classmethod
    def profile(cls, runner, kv_dtype, context: int = 64, reps: int = 2) -> "CostModel":
        top = cls.POINTS[-1]
        kv = PagedKVCache(runner.cfg, 1, context + top, dtype=kv_dtype, resident=False)
        ids = [i % max(2, runner.cfg.vocab_size) for i in range(context + top)]
        with torch.inference_mode():
            runner.run(StepBatch.single(ids[:context], 0, [0], [context - 1]), kv)
            times = {}
            for rep in range(reps):
                for n in cls.POINTS:
                    if rep and n > 8:   # the small steps are the noisy ones
                        continue
                    t0 = time.perf_counter()
                    runner.run(StepBatch.single(ids[context:context + n], context, [0], list(range(n))), kv)
                    dt = time.perf_counter() - t0
                    times[n] = min(times.get(n, dt), dt)
        return cls(times)

    def t(self, n: int) -> float:
        if n < len(self._table):
            return self._table[n]
        if self._dirty or not self._table:
            self._table = [self._t(i) for i in range(512)]
            self._dirty = 0
            if n < 512:
                return self._table[n]
        return self._t(n)

    def _t(self, n: int) -> float:
        if n <= self.n[-1]:
            return float(np.interp(n, self.n, self.s))
        slope = (self.s[-1] - self.s[-2]) / (self.n[-1] - self.n[-2])
        return float(self.s[-1] + slope * (n - self.n[-1]))

    def observe(self, n: int, dt: float) -> None:
        """Blend a measured step of n tokens into the point it sits on (the machine's load drifts)."""
        i = np.searchsorted(self.n, n)
        if i < len(self.n) and self.n[i] == n:
            self.s[i] = 0.9 * self.s[i] + 0.1 * dt
            self.s = np.maximum.accumulate(self.s)
            self._dirty += 1
            if self._dirty >= 32:       # rebuilt on the next lookup past the table
                self._table = []


_PROFILES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cost_model(runner, kv_dtype) -> CostModel:
    """The runner's profile (measured once per runner and KV dtype)."""
    per = _PROFILES.setdefault(runner, {})
    if kv_dtype not in per:
        per[kv_dtype] = CostModel.profile(runner, kv_dtype)
    return per[kv_dtype]


class SpecState:
    """One request's speculation: its proposer, acceptance (decayed sums; the prior is the engine's
    recent acceptance for the mode, weighing as two drafts), the probe
    schedule while off, the seed of its keyed draws, and counters."""

    def __init__(self, mode: str, params, prior: float = 0.5):
        self.mode = mode
        self.prior = prior                         # acceptance expected before any draft of its own
        self.keyed = not params.is_greedy          # every token drawn by keyed_uniform (see Speculator)
        self.seed = request_seed(params) if self.keyed else 0
        self.acc = self.rej = 0.0
        self.ngram = None
        self.off, self.off_steps, self.probe_every = False, 0, 8
        self.drafted = self.accepted = self.verify_steps = 0
        self.draft_q = None                        # this step's draft probabilities (None: one-hot)

    def alpha(self) -> float:
        return (self.acc + 2.0 * self.prior) / (self.acc + self.rej + 2.0)

    def record(self, k: int, a: int) -> None:
        self.acc = 0.8 * self.acc + a
        self.rej = 0.8 * self.rej + (a < k)
        self.drafted += k
        self.accepted += a
        self.verify_steps += 1
        if a == k:
            self.probe_every = 8


class Speculator:
    """The engine's speculation: extends decode chunks with drafts before a step, verifies their
    rows after it, and keeps the figures (`stats`)."""

    def __init__(self, engine, draft=None, max_draft: int = 16, margin: float = 0.03):
        self.engine = engine
        self.ngram = NgramProposer()
        self.draft = draft
        self.max_draft = max_draft
        self.margin = margin
        self._cost = None
        self.drafted = self.accepted = self.verify_steps = self.chunks_verified = 0
        self.emitted = 0
        self.recent = {}                 # mode -> [decayed accepted, decayed rejections] over all requests
        self.saved_s = 0.0
        self.draft_s = 0.0
        self._pending = None

    @property
    def cost(self) -> CostModel:
        if self._cost is None:
            self._cost = cost_model(self.engine.runner, self.engine.kv_dtype)
            if self.draft is not None and not self.draft.cost_per_token_s:
                self.draft.cost_per_token_s = cost_model(self.draft.runner, self.draft.kv.k[0].dtype).t(1)
        return self._cost

    # --- before the step ----------------------------------------------------------------------
    def _choose(self, alpha: float, kmax: int, tokens: float, base: int, busy: float, per_tok: float,
                margin: float | None = None) -> int:
        """The draft length that maximises expected tokens per second of the whole step."""
        cost = self.cost
        margin = self.margin if margin is None else margin
        best_k, best = 0, tokens / (cost.t(base) + busy) * (1 + margin)
        for k in range(1, kmax + 1):
            gain = alpha * (1 - alpha ** k) / (1 - alpha)
            v = (tokens + gain) / (cost.t(base + k) + busy + k * per_tok)
            if v > best:
                best_k, best = k, v
            elif k > best_k + 2:     # past the peak (tokens per second is unimodal in k here)
                break
        return best_k

    def extend(self, batch: ScheduledBatch) -> None:
        sched = self.engine.scheduler
        if self.draft is not None:
            for rid in [r for r in self.draft.seqs if r not in self.engine._requests]:
                self.draft.release_id(rid)
        decs = [c for c in batch.chunks if c.sample and c.num_tokens == 1 and c.req.spec is not None
                and c.req.prefill_done and c.req.spec.mode != "off"]
        self._pending = None
        if not decs:
            return
        t0 = time.perf_counter()
        base = batch.num_tokens
        budget = sched.max_step_tokens - base
        tokens = float(sum(1 for c in batch.chunks if c.sample))
        busy = 0.0
        plans = []
        # With several requests decoding and none waiting, a request's accepted drafts end it sooner
        # but shorten the batch only if it is the last to finish, while its draft rows slow every
        # step: auto then asks a margin that grows with the requests sharing the step.
        margin = self.margin * (len(decs) if len(decs) > 1 and not sched.waiting else 1)
        for c in decs:
            req, st = c.req, c.req.spec
            probe = False
            if st.off:                      # auto turned it off: no lookup until the next probe
                st.off_steps += 1
                if st.off_steps < st.probe_every:
                    continue
                st.off_steps, st.probe_every, probe = 0, min(2 * st.probe_every, 256), True
            limit = min(self.max_draft, budget, req.max_new_tokens - len(req.output_ids) - 1,
                        sched._fits(req) - 1)
            if self.engine.max_context:
                limit = min(limit, self.engine.max_context - len(req.tokens))
            if limit <= 0:
                continue
            drafter = self.draft if st.mode == "draft" else self.ngram
            cand = None
            if drafter is self.ngram:
                cand = self.ngram.propose([(req, limit)])[0][0]
                if not cand:
                    continue
                limit = len(cand)
            k = self._choose(st.alpha(), limit, tokens, base, busy, drafter.cost_per_token_s,
                             margin if st.mode == "auto" else None)
            if k == 0:
                if st.mode != "auto":
                    k = 1
                elif not probe:
                    st.off, st.off_steps = True, 0
                    continue
                elif not self._choose(1.0 - 1e-6, limit, tokens, base, busy, drafter.cost_per_token_s, margin):
                    # not even drafts that are all accepted would pay here (many requests sharing the step,
                    # none waiting): a probe could only cost; probed again on the schedule
                    st.off, st.off_steps = True, 0
                    continue
                else:
                    k = min(2, limit)
            st.off = False
            alpha = st.alpha()
            tokens += alpha * (1 - alpha ** k) / (1 - alpha)
            busy += k * drafter.cost_per_token_s
            base += k
            budget -= k
            plans.append((c, k, cand))
        if not plans:
            return
        drafts = [(cand[:k], None) if cand is not None else None for c, k, cand in plans]
        need = [(c.req, k) for (c, k, cand), d in zip(plans, drafts) if d is None]
        if need:
            got = iter(self.draft.propose(need))
            drafts = [d if d is not None else next(got) for d in drafts]
        for (c, k, _), (d, q) in zip(plans, drafts):
            c.req.spec.draft_q = q
            if not d:
                continue
            sched.kv.reserve(c.req.seq, len(d))
            c.draft = list(d)
            c.num_tokens += len(d)
        self.draft_s += time.perf_counter() - t0
        self._pending = (batch.num_tokens - sum(len(c.draft) for c in batch.chunks), time.perf_counter() - t0)

    # --- after the step -------------------------------------------------------------------------
    def sample(self, batch: ScheduledBatch, logits: torch.Tensor, sampler) -> list[SampleResult]:
        routed = [bool(c.draft) or (c.sample and c.req.spec is not None and c.req.spec.keyed) for c in batch.chunks]
        if not any(routed):
            return sampler(batch, logits)
        spans, off = [], 0
        for c in batch.chunks:
            n = len(c.logit_positions)
            spans.append((off, off + n))
            off += n
        # the plain chunks sampled in place (no copy of their rows), the routed ones verified here
        skip = {i for i, r in enumerate(routed) if r}
        results: list = sampler(batch, logits, skip=skip) if len(skip) < len(batch.chunks) else [None] * len(skip)
        for i, r in enumerate(routed):
            if r:
                c = batch.chunks[i]
                try:
                    results[i] = self.verify(c, logits[spans[i][0]:spans[i][1]], sampler)
                except Exception as e:  # noqa: BLE001 - isolate the request
                    results[i] = SampleResult(error=f"{type(e).__name__}: {e}")
        return results

    def verify(self, c, rows: torch.Tensor, sampler) -> SampleResult:
        """The chunk's known tokens then its drafts: accept drafts while the target's own choice at
        each position (argmax, or the keyed draw) agrees; the first disagreement is the next token."""
        req, st, draft = c.req, c.req.spec, c.draft
        npr = len(c.prompt_positions)
        res = sampler.sample_one(replace(c, sample=False), rows[:npr]) if npr else SampleResult()
        params = req.params
        counts = req.counts.clone() if (req.counts is not None and draft) else req.counts
        pos = len(req.tokens)
        lps = []
        for j in range(len(draft) + 1):
            row = rows[npr + j]
            d = draft[j] if j < len(draft) else None
            if st.keyed:
                p = target_probs(row, params, counts, req.prompt_seen)
                q = st.draft_q[j] if (d is not None and st.draft_q) else None
                ok, tok = rejection_sample(p, q, -1 if d is None else d, keyed_uniform(st.seed, pos + j, 1),
                                           keyed_uniform(st.seed, pos + j))
            else:
                tok = sample_token(row, params, None, counts, req.prompt_seen)
            if req.logprobs is not None:
                lsm = torch.log_softmax(row.float(), dim=-1)
                top = []
                if req.logprobs:
                    v, ix = torch.topk(lsm, min(req.logprobs, lsm.shape[-1]))
                    top = list(zip(ix.tolist(), v.tolist()))
                lps.append(TokenLogprob(tok, float(lsm[tok]), top))
            if d is not None and (ok if st.keyed else tok == d):
                res.accepted.append(tok)
                if counts is not None:
                    counts[tok] += 1
                continue
            res.token_id = tok
            break
        if req.logprobs is not None:
            res.accepted_logprobs, res.logprob = lps[:-1], lps[-1]
        return res

    def observe(self, batch: ScheduledBatch, results: list[SampleResult], model_s: float) -> None:
        """Update acceptance, the cost model and the figures after a step."""
        n_sample = sum(1 for c in batch.chunks if c.sample)
        base0 = batch.num_tokens - sum(len(c.draft) for c in batch.chunks)
        gained, had = 0, False
        for c, r in zip(batch.chunks, results):
            if c.draft and r.error is None:
                had = True
                a = len(r.accepted)
                c.req.spec.record(len(c.draft), a)
                r_ = self.recent.setdefault(c.req.spec.mode, [0.0, 0.0])
                r_[0], r_[1] = 0.98 * r_[0] + a, 0.98 * r_[1] + (a < len(c.draft))
                self.drafted += len(c.draft)
                self.accepted += a
                self.chunks_verified += 1
                gained += a
            if c.sample and r.error is None:
                self.emitted += 1 + len(r.accepted)
            if c.req.finished and self.draft is not None:
                self.draft.release(c.req)
        if had:
            self.verify_steps += 1
            t0 = self.cost.t(base0)
            draft_s = self._pending[1] if self._pending else 0.0
            self.saved_s += gained * t0 / max(1, n_sample) - (model_s + draft_s - t0)
        elif self._cost is not None:
            self.cost.observe(batch.num_tokens, model_s)

    def prior(self, mode: str) -> float:
        """The acceptance a new request of this mode starts from: the recent one over all requests."""
        acc, rej = self.recent.get(mode, (0.0, 0.0))
        return (acc + 1.0) / (acc + rej + 2.0)

    def stats(self) -> dict:
        return {"spec_drafted_tokens": self.drafted, "spec_accepted_tokens": self.accepted,
                "spec_acceptance": self.accepted / self.drafted if self.drafted else 0.0,
                "spec_verify_steps": self.verify_steps,
                "spec_tokens_per_verify": (self.accepted + self.chunks_verified) / self.chunks_verified
                if self.chunks_verified else 0.0,
                "spec_time_saved_s": self.saved_s, "spec_draft_s": self.draft_s}
