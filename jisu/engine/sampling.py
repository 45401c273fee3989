"""Sampler: a step's logits rows -> one SampleResult per scheduled chunk (the sampled token, its
log-prob, prompt log-probs), each request with its own options, generator and penalty counts."""
from __future__ import annotations

import logging
import traceback

import torch

from .request import TokenLogprob
from .sampler import sample_token
from .scheduler import SampleResult, ScheduledBatch

log = logging.getLogger("jisu.engine")


class Sampler:
    """Per-request sampling from a step's logits rows: each request with its own options,
    generator and penalty counts; a failure in one request is reported for that request only."""

    def __call__(self, batch: ScheduledBatch, logits: torch.Tensor) -> list[SampleResult]:
        results, off = [], 0
        one = len(batch.chunks) == 1  # (a single sequence's step: its rows are all the rows)
        for c in batch.chunks:
            n = len(c.logit_positions)
            rows = logits if one else logits[off:off + n]
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
            masked = row if req.constraint is None else req.constraint.apply(row)
            token = sample_token(masked, req.params, req.generator, req.counts, req.prompt_seen)
            if req.constraint is not None:
                req.constraint.accept(token)
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
