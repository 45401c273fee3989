"""Sampler: a step's logits rows -> one SampleResult per scheduled chunk (the sampled token, its
log-prob, prompt log-probs). Every row of the step is drawn in one call to the native batched
sampler (jisu._kernels.sample_rows); the Python reference (sampler.py) draws the same tokens where
the native module is missing, and is what the native one is tested against.

The functions below are the one interface the speculative verifier and beam search share:
`sample_rows` (batched draws with raw log-probs), `filtered_dist` (a row's sparse sampling
distribution), `rejection_sample` (speculative sampling's accept / resample step)."""
from __future__ import annotations

import logging
import traceback
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from ..config import SamplingParams
from ..kernels import _native
from . import sampler as ref
from .request import TokenLogprob
from .sampler import Dist, KeyedGenerator, keyed_uniform
from .scheduler import SampleResult, ScheduledBatch

log = logging.getLogger("jisu.engine")

__all__ = ["Sampler", "RowSpec", "sample_rows", "filtered_dist", "rejection_sample", "keyed_uniform", "Dist",
           "native_sampler_available"]


_NATIVE = None   # the module once found (it does not go away)


def native_sampler_available() -> bool:
    global _NATIVE
    if _NATIVE is None:
        K = _native.get()
        if K is None or not hasattr(K, "sample_rows"):
            return False
        _NATIVE = K
    return True


@dataclass
class RowSpec:
    """How to draw from one logits row: the options, the key of its uniform (seed, position of the
    drawn token in the sequence), penalty state and how many top log-probs to return (None: no
    log-probs; 0: only the drawn token's)."""
    params: SamplingParams
    seed: int = 0
    position: int = 0
    counts: torch.Tensor | None = None       # [V] fp32 generated-token counts
    prompt_seen: torch.Tensor | None = None  # [V] bool
    logprobs: int | None = None


@dataclass
class Drawn:
    token: int
    logprob: TokenLogprob | None = None


def _param_rows(spec: RowSpec, V: int) -> tuple[list[float], list[int], list[torch.Tensor]]:
    p, keep = spec.params, []
    counts = seen = 0
    if spec.counts is not None and ref.needs_counts(p):
        c = spec.counts if spec.counts.dtype == torch.float32 else spec.counts.float()
        c = c.contiguous()
        if c.numel() < V:
            raise ValueError("penalty counts shorter than the vocabulary")
        keep.append(c)
        counts = c.data_ptr()
        if spec.prompt_seen is not None:
            s = spec.prompt_seen.contiguous()
            if s.numel() < V or s.dtype != torch.bool:
                raise ValueError("prompt_seen must be a bool tensor over the vocabulary")
            keep.append(s)
            seen = s.data_ptr()
    seed = spec.seed & ((1 << 64) - 1)
    seed = seed - (1 << 64) if seed >= 1 << 63 else seed   # the same 64 bits as an int64
    f = [float(p.temperature), float(p.top_p), float(p.min_p), float(p.repetition_penalty),
         float(p.presence_penalty), float(p.frequency_penalty)]
    i = [int(p.top_k), seed, int(spec.position), counts, seen, -1 if spec.logprobs is None else int(spec.logprobs)]
    return f, i, keep


def _native_ok(logits: torch.Tensor) -> bool:
    return (native_sampler_available() and logits.dtype == torch.float32 and logits.device.type == "cpu"
            and logits.dim() == 2 and logits.stride(1) == 1 and logits.shape[1] > 0)


def sample_rows(logits: torch.Tensor, specs: list[RowSpec], rows: list[int] | None = None) -> list[Drawn]:
    """One token per spec: specs[i] draws from logits row rows[i] (row i when rows is None),
    natively in one call when the module is built, else by the reference; both give the same tokens."""
    n_rows = logits.shape[0] if rows is None else len(rows)
    if len(specs) != n_rows:
        raise ValueError(f"{len(specs)} row specs for {n_rows} logits rows")
    if not specs:
        return []
    if rows is not None and not all(0 <= r < logits.shape[0] for r in rows):
        raise ValueError("row index outside the logits")
    if not _native_ok(logits):
        idx = range(len(specs)) if rows is None else rows
        return [_ref_row(logits[r], s) for r, s in zip(idx, specs)]
    R, V = len(specs), logits.shape[1]
    row_ids = None if rows is None else np.array(rows, dtype=np.int64)
    rows = [_param_rows(s, V) for s in specs]
    # numpy buffers: a torch.tensor from lists costs ~50 us, a sizeable part of a small model's step
    fp = np.array([r[0] for r in rows], dtype=np.float64)
    ip = np.array([r[1] for r in rows], dtype=np.int64)
    max_top = max(max(s.logprobs or 0 for s in specs), 1)
    tokens = np.empty(R, dtype=np.int64)
    lps = np.empty(R, dtype=np.float64)
    top_ids = np.empty((R, max_top), dtype=np.int64)
    top_lp = np.empty((R, max_top), dtype=np.float64)
    _NATIVE.sample_rows(logits.data_ptr(), R, V, logits.stride(0), fp.ctypes.data, ip.ctypes.data,
                        tokens.ctypes.data, lps.ctypes.data, top_ids.ctypes.data, top_lp.ctypes.data, max_top,
                        0 if row_ids is None else row_ids.ctypes.data)
    out = []
    toks = tokens.tolist()
    want = [s.logprobs is not None for s in specs]
    lp_list = lps.tolist() if any(want) else None
    for r, s in enumerate(specs):
        lp = None
        if want[r]:
            n = s.logprobs
            top = list(zip(top_ids[r, :n].tolist(), top_lp[r, :n].tolist())) if n else []
            lp = TokenLogprob(toks[r], lp_list[r], top)
        out.append(Drawn(toks[r], lp))
    return out


def _ref_row(row: torch.Tensor, s: RowSpec, generator: torch.Generator | None = None) -> Drawn:
    """The reference's draw (a caller's own torch generator: its unkeyed draw)."""
    counts = s.counts if ref.needs_counts(s.params) else None
    token = ref.sample_token(row, s.params, generator or KeyedGenerator(s.seed), counts, s.prompt_seen,
                             position=s.position)
    lp = None
    if s.logprobs is not None:
        lsm = torch.log_softmax(row.float(), dim=-1)
        lp = TokenLogprob(token, float(lsm[token]), _topk(lsm[None], s.logprobs)[0])
    return Drawn(token, lp)


def filtered_dist(row: torch.Tensor, params: SamplingParams, counts: torch.Tensor | None = None,
                  prompt_seen: torch.Tensor | None = None) -> Dist:
    """A row's sampling distribution (sparse, ascending ids), native when built."""
    if row.dim() != 1 or not _native_ok(row[None]):
        return ref.filtered_dist(row, params, counts if ref.needs_counts(params) else None, prompt_seen)
    V = row.shape[0]
    f, i, keep = _param_rows(RowSpec(params, counts=counts, prompt_seen=prompt_seen), V)
    fp, ip = torch.tensor(f, dtype=torch.float64), torch.tensor(i, dtype=torch.int64)
    ids, probs = torch.empty(V, dtype=torch.int64), torch.empty(V, dtype=torch.float64)
    n = _native.get().filtered_dist(row.data_ptr(), V, fp.data_ptr(), ip.data_ptr(), ids.data_ptr(),
                                    probs.data_ptr())
    return Dist(ids[:n].clone(), probs[:n].clone())


def rejection_sample(p: Dist, q: Dist, token: int, u_accept: float, u_resample: float) -> tuple[int, bool]:
    """Accept draft `token` (drawn from q) against the target's p, else resample from
    normalize(max(p - q, 0)); see sampler.rejection_sample (the reference) for the seeded variant."""
    if not native_sampler_available():
        return ref.rejection_sample(p, q, token, u_accept, u_resample)
    pi, pp = p.ids.to(torch.int64).contiguous(), p.probs.to(torch.float64).contiguous()
    qi, qp = q.ids.to(torch.int64).contiguous(), q.probs.to(torch.float64).contiguous()
    t, ok = _native.get().rejection_sample(pi.data_ptr(), pp.data_ptr(), len(pi), qi.data_ptr(), qp.data_ptr(),
                                           len(qi), int(token), float(u_accept), float(u_resample))
    return int(t), bool(ok)


class Sampler:
    """Per-request sampling from a step's logits rows: every sampling row in one batched draw,
    each request with its own options, keyed uniforms and penalty counts; a failure in one request
    is reported for that request only."""

    def __init__(self):
        self._drawn: dict[int, Drawn] = {}
        self._specs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self, batch: ScheduledBatch, logits: torch.Tensor, skip: set[int] | None = None) -> list[SampleResult]:
        """One result per chunk of the batch; chunks whose index is in `skip` keep their rows but
        are not sampled (their result is None: the speculative verifier takes them)."""
        self._drawn = self._draw_batch(batch, logits, skip)
        try:
            results, off = [], 0
            one = len(batch.chunks) == 1  # (a single sequence's step: its rows are all the rows)
            for i, c in enumerate(batch.chunks):
                n = len(c.logit_positions)
                rows = logits if one else logits[off:off + n]
                off += n
                if skip and i in skip:
                    results.append(None)
                    continue
                try:
                    results.append(self.sample_one(c, rows))
                except Exception as e:  # noqa: BLE001 - isolate the request
                    log.error("sampling failed for request %s: %s", c.req.id, traceback.format_exc())
                    results.append(SampleResult(error=f"{type(e).__name__}: {e}"))
            return results
        finally:
            self._drawn = {}

    def _spec(self, req) -> RowSpec | None:
        """The request's row spec (its position updated), None when only the reference can draw it."""
        spec = self._specs.get(req)
        if spec is None:
            g = req.generator
            if g is not None and not isinstance(g, KeyedGenerator):
                return None
            spec = RowSpec(req.params, g.seed if g is not None else 0, 0, req.counts, req.prompt_seen, req.logprobs)
            self._specs[req] = spec
        spec.position = len(req.tokens)
        return spec

    def _draw_batch(self, batch: ScheduledBatch, logits: torch.Tensor, skip: set[int] | None = None
                    ) -> dict[int, Drawn]:
        """Every sampling chunk's token (those not in skip), natively in one call: chunk id -> Drawn."""
        if not _native_ok(logits):
            return {}
        chunks, rows, specs, off = [], [], [], 0
        for i, c in enumerate(batch.chunks):
            n = len(c.logit_positions)
            off += n
            if c.sample and not (skip and i in skip):
                spec = self._spec(c.req)
                if spec is not None:
                    chunks.append(c)
                    rows.append(off - 1)
                    specs.append(spec)
        if not specs:
            return {}
        if any(c.req.constraint is not None for c in chunks):   # structured output: the grammar's mask
            # in place, in numpy: the rows drawn here are read again only by the draw, and a torch
            # op this size wakes the intra-op pool, whose spinning threads then slow the next step
            arr = logits.numpy()
            for i, c in enumerate(chunks):
                if c.req.constraint is not None:
                    c.req.constraint.mask_(arr[rows[i]])
        try:   # the rows drawn in place (a copy of a step's rows cost ~1 ms at 16 streams)
            drawn = sample_rows(logits, specs, None if rows == list(range(logits.shape[0])) else rows)
        except Exception:  # noqa: BLE001 - each request is drawn (or fails) on its own
            log.error("batched sampling failed: %s", traceback.format_exc())
            return {}
        return {id(c): d for c, d in zip(chunks, drawn)}

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
            drawn = self._drawn.get(id(chunk))
            if drawn is None:
                g = req.generator
                spec = RowSpec(req.params, g.seed if isinstance(g, KeyedGenerator) else 0, len(req.tokens),
                               req.counts, req.prompt_seen, req.logprobs)
                row = rows[-1] if req.constraint is None else req.constraint.apply(rows[-1])
                drawn = _ref_row(row, spec, g if isinstance(g, torch.Generator) else None)
            if req.constraint is not None:
                req.constraint.accept(drawn.token)
            res.token_id = drawn.token
            res.logprob = drawn.logprob
        return res


def _topk(lsm: torch.Tensor, n: int | None) -> list[list[tuple[int, float]]]:
    if not n:
        return [[] for _ in range(lsm.shape[0])]
    vals, idx = torch.topk(lsm, min(n, lsm.shape[-1]), dim=-1)
    return [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
