"""Speculative decoding: proposers of draft tokens (n-gram prompt lookup, a draft model), the
random numbers keyed by (seed, position) that make seeded sampling independent of speculation, and
the verification math (greedy match, one-hot sample-and-compare, rejection sampling)."""
from __future__ import annotations

import random
from typing import Protocol, Sequence

import numpy as np
import torch

from ..config import SamplingParams
from ..errors import JisuError
from .batch import StepBatch
from .kv_cache import PagedKVCache, SeqBlocks
from .sampler import filtered_dist, keyed_uniform

MODES = ("auto", "ngram", "draft", "off")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise JisuError(f"speculative={mode!r}: use one of {', '.join(MODES)}")
    return mode


# --- random numbers keyed by (seed, position): the sampler's own (engine/sampler.py), so that a
# token verified here is the token the plain sampler draws with the same seed at that position ---
def request_seed(params: SamplingParams) -> int:
    return params.seed if params.seed is not None else random.getrandbits(63)


# --- the target's distribution and the draws ----------------------------------------------------------
def target_probs(row: torch.Tensor, params: SamplingParams, counts=None, prompt_seen=None) -> np.ndarray:
    """The distribution a sampled token is drawn from (penalties, temperature, top-k/p, min-p):
    float64 [V], the reference sampler's filtered distribution (sampler.filtered_dist) made dense."""
    d = filtered_dist(row, params, counts, prompt_seen)
    p = np.zeros(row.shape[-1], dtype=np.float64)
    p[d.ids.numpy()] = d.probs.double().numpy()
    return p


def inverse_cdf(probs: np.ndarray, u: float) -> int:
    """The token whose slice of [0, total) in token-id order holds u * total (never a zero-prob token)."""
    cdf = np.cumsum(probs)
    i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    if i >= len(cdf):
        i = int(np.flatnonzero(probs)[-1])
    return i


def rejection_sample(p: np.ndarray, q: np.ndarray | None, x: int, u_accept: float,
                     u_resample: float) -> tuple[bool, int]:
    """One step of speculative sampling for draft token x drawn from q (None: x was proposed
    deterministically, q one-hot). Returns (accepted, token); the token is distributed as p.

    One-hot q: accept with probability p(x), else draw from p without x. Done as sample-and-compare
    (token = inverse_cdf(p, u_resample), accepted iff it is x), which is that rule exactly and gives
    the token plain sampling gives with the same u: seeded text does not depend on the drafts.
    Otherwise the standard rule: accept if u_accept < p(x) / q(x), else draw from max(p - q, 0)."""
    if q is None:
        t = inverse_cdf(p, u_resample)
        return t == x, t
    if q[x] > 0 and u_accept * q[x] < p[x]:
        return True, x
    residual = np.maximum(p - q, 0.0)
    if residual.sum() <= 0:  # p == q: never reached with u_accept < 1, kept for safety
        residual = p
    return False, inverse_cdf(residual, u_resample)


# --- proposers ----------------------------------------------------------------------------------------
class Proposer(Protocol):
    """Draft tokens for requests. `propose` gets (request, k) pairs and returns per request a list
    of at most k draft token ids (possibly empty) and their draft probabilities (None: proposed
    deterministically, a one-hot q)."""
    name: str
    cost_per_token_s: float      # time to draft one token (0 for lookups)

    def propose(self, wants: Sequence[tuple[object, int]]) -> list[tuple[list[int], list | None]]: ...

    def release(self, req) -> None: ...


class NgramIndex:
    """Per-request index of the n-grams of prompt + generated text (n in [n_min, n_max]) -> the
    position after their latest occurrence, updated incrementally (O(new tokens) per step)."""

    def __init__(self, n_min: int = 2, n_max: int = 4):
        self.n_min, self.n_max = n_min, n_max
        self.maps = {n: {} for n in range(n_min, n_max + 1)}
        self.done = 0            # n-grams ending before this position are indexed

    def propose(self, tokens: list[int], k: int) -> list[int]:
        L = len(tokens)
        # index every n-gram that ends before the last token (the suffix itself must not match itself)
        for end in range(max(self.done, self.n_min), L):
            for n, m in self.maps.items():
                if end >= n:
                    m[tuple(tokens[end - n:end])] = end
        self.done = max(self.done, L)
        for n in range(self.n_max, self.n_min - 1, -1):
            if L < n:
                continue
            nxt = self.maps[n].get(tuple(tokens[L - n:]))
            if nxt is not None:
                return tokens[nxt:nxt + k]
        return []


class NgramProposer:
    """Prompt lookup: the longest suffix (n_max down to n_min tokens) of the text so far that
    occurred before proposes the tokens that followed its latest occurrence."""
    name = "ngram"
    cost_per_token_s = 0.0

    def __init__(self, n_min: int = 2, n_max: int = 4):
        self.n_min, self.n_max = n_min, n_max

    def propose(self, wants):
        out = []
        for req, k in wants:
            st = req.spec
            if st.ngram is None:
                st.ngram = NgramIndex(self.n_min, self.n_max)
            out.append((st.ngram.propose(req.tokens, k), None))
        return out

    def release(self, req) -> None:
        pass


def check_same_vocab(target_tokenizer, target_cfg, draft_tokenizer, draft_cfg) -> None:
    """Raise JisuError unless the draft model's tokens mean what the target's mean."""
    if draft_cfg.vocab_size != target_cfg.vocab_size:
        raise JisuError(f"the draft model's vocabulary has {draft_cfg.vocab_size} entries, the target's "
                        f"{target_cfg.vocab_size}: a draft model must share the target's tokenizer")
    if target_tokenizer is None or draft_tokenizer is None:
        return
    a, b = target_tokenizer._tok.get_vocab(with_added_tokens=True), draft_tokenizer._tok.get_vocab(with_added_tokens=True)
    if a != b:
        diff = next((t for t in a if b.get(t) != a[t]), None)
        raise JisuError(f"the draft model's tokenizer differs from the target's (token {diff!r} has id "
                        f"{a.get(diff)} in the target, {b.get(diff)} in the draft): a draft model must share it")


class _DraftSeq:
    def __init__(self):
        self.seq = SeqBlocks()
        self.tokens: list[int] = []          # the tokens whose K/V the draft cache holds


class DraftModelProposer:
    """A smaller (or more compressed) model with the target's tokenizer drafts greedily, with its
    own runner and its own paged KV pool (the engine's scheduler decides who drafts). Each call
    brings every drafting request's cache up to its text in one batched step, then drafts the
    remaining tokens one batched step each."""
    name = "draft"

    def __init__(self, runner, kv_memory_mb: float = 64, block_size: int = 16, kv_dtype=None,
                 sample: bool = False):
        self.runner = runner
        # sample=True: sampled requests draw their drafts from the draft model's own (filtered)
        # distribution q, verified by rejection sampling (higher acceptance than greedy drafts,
        # but a seed's text then depends on the drafts); False: greedy drafts, q one-hot
        self.sample = sample
        self.kv = PagedKVCache.for_memory(runner.cfg, int(kv_memory_mb * 2**20), block_size,
                                          dtype=kv_dtype or runner.kv_dtype, resident=False)
        self.seqs: dict[str, _DraftSeq] = {}
        self.max_step_tokens = min(256, getattr(runner, "max_step_tokens", 256))
        self.cost_per_token_s = 0.0          # set by the engine's profile

    @classmethod
    def from_llm(cls, draft_llm, target_tokenizer, target_cfg, *, same_as_target: bool = False,
                 **kw) -> "DraftModelProposer":
        """A draft from a loaded model. Another model drafts with its plain runner: a draft's numbers
        decide only how many of its tokens are accepted (the target verifies every one), so it runs
        the fast int8 activations, not the faithful steps. The target's own file drafting for it
        (`same_as_target`) runs the target's steps, so that every draft is accepted."""
        check_same_vocab(target_tokenizer, target_cfg, draft_llm.tokenizer, draft_llm.config)
        return cls(draft_llm.step_runner if same_as_target else draft_llm.runner, **kw)

    def release(self, req) -> None:
        self.release_id(req.id)

    def release_id(self, request_id: str) -> None:
        ds = self.seqs.pop(request_id, None)
        if ds is not None:
            self.kv.free(ds.seq)

    def _sync(self, req) -> _DraftSeq:
        """The request's draft sequence, rolled back to the longest prefix its text still shares."""
        ds = self.seqs.get(req.id)
        if ds is None:
            ds = self.seqs[req.id] = _DraftSeq()
        toks, n = req.tokens, 0
        m = min(len(ds.tokens), len(toks) - 1)
        while n < m and ds.tokens[n] == toks[n]:
            n += 1
        if n < len(ds.tokens):
            self.kv.truncate(ds.seq, n)
            del ds.tokens[n:]
        return ds

    def _run(self, items: list[tuple[_DraftSeq, list[int]]]) -> list[torch.Tensor]:
        """Append each item's tokens to its draft sequence in steps within the budget; returns the
        logits of each item's last new token."""
        nxt: list = [None] * len(items)
        pending = [(i, ds, toks) for i, (ds, toks) in enumerate(items)]
        while pending:
            chunks, budget, rest = [], self.max_step_tokens, []
            for i, ds, toks in pending:
                if budget <= 0:
                    rest.append((i, ds, toks))
                    continue
                part = toks[:budget]
                budget -= len(part)
                chunks.append((i, ds, part, len(part) == len(toks)))
                if len(part) < len(toks):
                    rest.append((i, ds, toks[len(part):]))
            starts = [len(ds.tokens) for _, ds, _, _ in chunks]
            for _, ds, part, _ in chunks:
                self.kv.reserve(ds.seq, len(part))
            flat, rows, off = [], [], 0
            for _, _, part, last in chunks:
                flat += part
                off += len(part)
                if last:
                    rows.append(off - 1)
            step = StepBatch(flat, [len(p) for _, _, p, _ in chunks], starts,
                             [ds.seq.block_table for _, ds, _, _ in chunks], rows or [off - 1], [0] * len(chunks))
            logits = self.runner.run(step, self.kv)
            r = 0
            for i, ds, part, last in chunks:
                ds.tokens += part
                if last:
                    nxt[i] = logits[r]
                    r += 1
            pending = rest
        return nxt

    def _pick(self, req, row: torch.Tensor, pos: int):
        """The draft token at position `pos` from the draft model's logits row, and its q (None: greedy)."""
        if self.sample and not req.params.is_greedy and req.spec is not None:
            q = target_probs(row, req.params)
            return inverse_cdf(q, keyed_uniform(req.spec.seed, pos, 2)), q
        return int(row.numpy().argmax()), None

    def propose(self, wants):
        out: list[tuple[list[int], list | None]] = [([], None) for _ in wants]
        active, free = [], self.kv.num_free_blocks
        for j, (req, k) in enumerate(wants):
            if k <= 0:
                continue
            ds = self._sync(req)
            new = req.tokens[len(ds.tokens):]
            need = self.kv.blocks_needed(ds.seq, len(new) + k - 1)
            if need > free:
                before = self.kv.num_free_blocks
                self.release(req)            # no room: this request drafts nothing now
                free += self.kv.num_free_blocks - before
                continue
            free -= need
            active.append((j, ds, new, k))
        while active:
            rows = self._run([(ds, new) for _, ds, new, _ in active])
            still = []
            for (j, ds, _, k), row in zip(active, rows):
                req, toks = wants[j][0], out[j][0]
                t, q = self._pick(req, row, len(req.tokens) + len(toks))
                toks.append(t)
                if q is not None:
                    if out[j][1] is None:
                        out[j] = (toks, [])
                    out[j][1].append(q)
                if len(toks) < k:
                    still.append((j, ds, [t], k))
            active = still
        return out


__all__ = ["MODES", "check_mode", "keyed_uniform", "target_probs", "inverse_cdf", "rejection_sample",
           "Proposer", "NgramProposer", "NgramIndex", "DraftModelProposer", "check_same_vocab"]
