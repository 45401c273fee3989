"""Beam search and best-of-n inside continuous batching. A beam group's sequences share the prompt's KV
blocks copy-on-write (kv_cache.fork) and decode as rows of the same steps as every other request; each
step ranks the group's candidates as transformers' beam search does (`num_beams`, `length_penalty`,
`early_stopping`, `num_return_sequences`). A fork group prefills one prompt once for n sampled candidates."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .request import Request, RequestOutput, Status
from .scheduler import ScheduledBatch, ScheduledChunk


@dataclass
class BeamSequence:
    """One finished beam, as returned to the caller."""
    token_ids: list[int]         # the generated tokens (a final stop token excluded)
    text: str
    score: float                 # cumulative_logprob / generated_len ** length_penalty (transformers' sequences_scores;
    #                              generated_len counts a final stop token)
    cumulative_logprob: float    # sum of the tokens' log-probabilities (the stop token's included)
    finish_reason: str           # "stop" | "length"


def log_softmax(x: np.ndarray) -> np.ndarray:
    """[V] logits -> float32 log-probabilities."""
    x = x.astype(np.float32) - x.max()
    return x - np.float32(np.log(np.exp(x).sum(dtype=np.float32)))


def top_k(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of x, largest first (equal values: the lower index first)."""
    part = np.argpartition(-x, k - 1)[:k] if k < x.size else np.arange(x.size)
    return part[np.lexsort((part, -x[part]))]


def beam_blocks_needed(num_prompt: int, max_new: int, num_beams: int, block_size: int) -> int:
    """KV blocks a beam search may hold at worst: the prompt's blocks once, each beam's own tail."""
    blocks = -(-(num_prompt + max_new) // block_size)
    return blocks + (num_beams - 1) * (-(-max_new // block_size) + 1)


class BeamGroup:
    """One beam-search request. `root` is its identity (id, callback, final output) and prefills the
    prompt; from its first ranking on, `live` beams (Requests forking its blocks) decode.

    The ranking follows transformers' GenerationMixin._beam_search (v4.50+): the top
    max(2, 1 + number of stop ids) x num_beams continuations over all beams by cumulative
    log-probability; of those, the first num_beams that end (stop token, or the length limit) are
    finished hypotheses scored by length, the first num_beams that do not are the next beams."""

    def __init__(self, root: Request, max_new: int):
        p = root.params
        self.root = root
        self.num_beams = p.num_beams
        self.length_penalty = p.length_penalty
        self.early_stopping = p.early_stopping
        self.num_return = p.num_return_sequences
        self.max_new = max_new                      # generated tokens at most (max_tokens, the context)
        self.num_keep = max(2, 1 + len(root.stop_ids)) * self.num_beams
        self.live: list[Request] = [root]
        self.scores = np.zeros(1, np.float32)       # [len(live)] running sum of log-probs, best first
        self.rows: dict[Request, np.ndarray] = {}   # live beam -> log-softmax [V] at its last position
        self.finished: list[tuple[float, float, list[int]]] = []  # (score, sum of log-probs, tokens), best first
        self.num_generated = 0                      # tokens every live beam has generated
        self.done = False

    def ready(self) -> bool:
        """Every live beam has its next-token row (a preempted one recomputes first)."""
        return all(b in self.rows and b.status is Status.RUNNING and b.num_remaining == 0 for b in self.live)

    def step(self) -> list[tuple[int, int]]:
        """Rank the candidates from the live beams' rows: the next beams as (index in `live` of the
        parent, token), best first; sets `done` when the search ends (then the list is empty)."""
        # numpy, float32 as transformers: small single-threaded ops (torch's pay for waking its threads)
        rows = np.stack([self.rows.pop(b) for b in self.live])        # [L, V]
        total = (rows + self.scores[:, None]).ravel()
        idx = top_k(total, min(self.num_keep, total.size))
        vals = total[idx]
        vocab = rows.shape[1]
        length = self.num_generated + 1
        last = length >= self.max_new
        stops = self.root.stop_ids
        # the first num_beams candidates that end are finished hypotheses, scored by their length
        fin_scores = (vals / np.float32(length ** self.length_penalty)).tolist()
        new = []
        plan, keep = [], []
        for r, (i, v) in enumerate(zip(idx.tolist(), vals.tolist())):
            parent, token = divmod(i, vocab)
            if last or token in stops:
                if r < self.num_beams:
                    new.append((fin_scores[r], v, self.live[parent].output_ids + [token]))
            elif len(plan) < self.num_beams:
                plan.append((parent, token))
                keep.append(r)
        self.finished = sorted(self.finished + new, key=lambda h: -h[0])[:self.num_beams]
        self.num_generated = length
        if last or len(plan) < self.num_beams or self._cannot_improve(float(vals[keep[0]])):
            self.done = True
            return []
        self.scores = vals[keep]
        return plan

    def _cannot_improve(self, best_running: float) -> bool:
        """transformers' stopping rule once num_beams hypotheses are finished: early_stopping True
        stops at once; otherwise stop when the best running beam, scored at the current length (or,
        for "never" with a positive length penalty, at the longest possible), is not better than the
        worst finished hypothesis."""
        if len(self.finished) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        lp = self.length_penalty
        best_len = self.max_new if (self.early_stopping == "never" and lp > 0) else self.num_generated
        best = float(np.float32(best_running) / np.float32(best_len ** lp))
        return not best > self.finished[-1][0]

    def sequences(self, decode) -> list[BeamSequence]:
        """The best num_return_sequences finished hypotheses; decode(tokens) -> text."""
        out = []
        for score, total, tokens in self.finished[:self.num_return]:
            stopped = bool(tokens) and tokens[-1] in self.root.stop_ids
            ids = tokens[:-1] if stopped else tokens
            out.append(BeamSequence(ids, decode(ids), score, total, "stop" if stopped else "length"))
        return out


class ForkGroup:
    """n requests on one prompt: `parent` prefills it; at its first sampled token the `children` take
    forks of its KV blocks and sample from the same logits row, each with its own options and seed."""

    def __init__(self, parent: Request, children: list[Request]):
        self.parent = parent
        self.children = children
        for r in [parent, *children]:
            r.group = self


class SearchGroups:
    """The engine's side of beam and fork groups: takes their chunks out of each step (beams) or adds
    the forked children's (forks), and finishes what an abort or a failure left behind."""

    def __init__(self, scheduler, kv, tokenizer=None):
        self.scheduler = scheduler
        self.kv = kv
        self.tokenizer = tokenizer
        self.beams: list[BeamGroup] = []
        self.forks: list[ForkGroup] = []

    def admit(self, req: Request) -> bool:
        """Register a new request's group; False for a fork child, which waits for its parent."""
        g = req.group
        if isinstance(g, BeamGroup):
            self.beams.append(g)
        elif isinstance(g, ForkGroup):
            if req is not g.parent:
                return False
            self.forks.append(g)
        return True

    # --- after the model step ----------------------------------------------------------------------
    def take(self, batch: ScheduledBatch, logits: torch.Tensor) -> tuple[ScheduledBatch, torch.Tensor, list]:
        """Handle the step's beam chunks (they leave the batch) and fork the children of parents that
        sample their first token (their chunks join it). Returns the batch and logits rows left for
        the sampler, and the outputs of beam groups that finished."""
        if all(c.req.group is None for c in batch.chunks):
            return batch, logits, []
        chunks, rows, off, touched = [], [], 0, []
        for c in batch.chunks:
            n = len(c.logit_positions)
            g = c.req.group
            if isinstance(g, BeamGroup):
                self._beam_chunk(c, logits[off:off + n])
                if g not in touched:
                    touched.append(g)
            else:
                chunks.append(c)
                rows += range(off, off + n)
                if isinstance(g, ForkGroup) and c.req is g.parent and c.sample and g.children:
                    for child in self._fork_children(g):
                        chunks.append(ScheduledChunk(child, c.start, c.num_tokens, True, []))
                        rows.append(off + n - 1)
            off += n
        outputs = []
        for g in touched:
            if not g.done and not g.root.finished and g.ready():
                outputs += self._advance(g)
        if rows != list(range(logits.shape[0])):
            logits = torch.from_numpy(logits.numpy()[rows])
        return ScheduledBatch(chunks), logits, outputs

    def _beam_chunk(self, c: ScheduledChunk, rows: torch.Tensor) -> None:
        req = c.req
        req.num_computed = c.start + c.num_tokens
        if self.scheduler.prefix_caching:
            self.kv.commit_prefix(req.seq, req.tokens)
        if c.sample:
            req.group.rows[req] = log_softmax(rows[-1].float().numpy())

    def _fork_children(self, g: ForkGroup) -> list[Request]:
        parent, running = g.parent, self.scheduler.running
        children = [ch for ch in g.children if not ch.finished]
        g.children = []
        self.forks.remove(g)
        at = running.index(parent) + 1
        for child in children:
            child.seq = self.kv.fork(parent.seq)
            child.status = Status.RUNNING
        running[at:at] = children
        return children

    def _advance(self, g: BeamGroup) -> list[RequestOutput]:
        """Rank the group's candidates; fork, continue and drop beams; finish the group when done."""
        root = g.root
        if root.first_token_time is None:
            root.first_token_time = time.monotonic()
        plan = g.step()
        if g.done:
            return self._finish(g)
        old, used, new = g.live, set(), []
        for parent, token in plan:
            p = old[parent]
            if p is root or p in used:
                p = self._fork(g, p)
            else:
                used.add(p)
            new.append((p, token))
        for b in old:
            if b not in used:
                self._drop(b)
        for b, token in new:
            b.tokens.append(token)
            b.output_ids.append(token)
        g.live = [b for b, _ in new]
        return []

    def _fork(self, g: BeamGroup, parent: Request) -> Request:
        root = g.root
        b = Request(f"{root.id}#beam", root.prompt_ids, root.params, max_new_tokens=root.max_new_tokens,
                    stop_ids=root.stop_ids)
        b.tokens, b.output_ids = list(parent.tokens), list(parent.output_ids)
        b.seq = self.kv.fork(parent.seq)
        b.num_computed = parent.num_computed
        b.status = Status.RUNNING
        b.group = g
        self.scheduler.running.append(b)
        return b

    def _drop(self, b: Request) -> None:
        """A beam no candidate continues: out of the scheduler, its blocks back to the pool."""
        s = self.scheduler
        if b in s.running:
            s.running.remove(b)
        elif b in s.waiting:
            s.waiting.remove(b)
        self.kv.free(b.seq)
        b.num_computed = 0
        if b is not b.group.root:
            b.status = Status.FINISHED

    def _finish(self, g: BeamGroup, reason: str | None = None, error: str | None = None) -> list[RequestOutput]:
        """End the group: every beam dropped; the root's output carries the best sequence (or the error)."""
        root = g.root
        g.done = True
        if g in self.beams:
            self.beams.remove(g)
        for b in g.live:
            if b is not root:
                self._drop(b)
        g.live = []
        if root.finished:
            return []
        if reason is not None:
            out = self.scheduler.abort(root, reason, error)
            return [out] if out is not None else []
        seqs = g.sequences(self._decode(root))
        if not seqs:
            out = self.scheduler.abort(root, "error", "beam search ended with no finished beam")
            return [out] if out is not None else []
        best = seqs[0]
        text = "".join(root.append_token(t)[0] for t in best.token_ids)
        out = self.scheduler.abort(root, best.finish_reason)
        out.token_ids, out.text, out.sequences = list(best.token_ids), text + out.text, seqs
        return [out]

    def _decode(self, root: Request):
        if self.tokenizer is None:
            return lambda ids: ""
        from ..io.tokenizer import StreamDecoder

        def decode(ids: list[int]) -> str:
            d = StreamDecoder(self.tokenizer, root.prompt_ids)
            return "".join(d.push(t) for t in ids)
        return decode

    # --- what aborts and failures leave behind ---------------------------------------------------------
    def reap(self) -> list[RequestOutput]:
        """Free the beams of aborted groups, end a group one of whose beams failed, and finish the
        unforked children of a parent that ended before its first token (aborted or failed)."""
        outputs = []
        for g in list(self.beams):
            failed = next((b for b in g.live if b is not g.root and b.finished), None)
            if g.root.finished:
                self._finish(g)
            elif failed is not None:
                outputs += self._finish(g, failed.finish_reason or "error", failed.error)
        for g in list(self.forks):
            if g.parent.finished:
                self.forks.remove(g)
                for child in g.children:
                    out = self.scheduler.abort(child, g.parent.finish_reason or "abort", g.parent.error)
                    if out is not None:
                        outputs.append(out)
                g.children = []
        return outputs


def attach_beam_group(req: Request, kv, max_context: int) -> None:
    """Make `req` the root of a beam group, or raise EngineError for what beam search cannot take."""
    from .config import EngineError

    p = req.params
    if req.logprobs is not None or req.prompt_logprobs is not None:
        raise EngineError("beam search returns no logprobs (its sequences carry their scores)")
    if p.stop:
        raise EngineError("beam search takes stop token ids, not stop strings")
    if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
        raise EngineError("beam search takes no presence, frequency or repetition penalty")
    if req.max_new_tokens < 1:
        raise EngineError("beam search needs max_tokens >= 1")
    need = beam_blocks_needed(req.num_prompt, req.max_new_tokens, p.num_beams, kv.block_size)
    if need > kv.pool.num_blocks:
        raise EngineError(f"beam search with {p.num_beams} beams on {req.num_prompt} prompt tokens and max_tokens "
                          f"{req.max_new_tokens} may need {need} KV blocks; the cache holds {kv.pool.num_blocks}")
    req.group = BeamGroup(req, min(req.max_new_tokens, max_context - req.num_prompt))
