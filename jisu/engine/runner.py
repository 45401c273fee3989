"""Model runners: `run(step, kv) -> logits [R, V]` for one StepBatch over a paged KV cache.
TorchRunner runs the reference model with a paged attention context; NativeRunner
(native_runner.py) runs the whole step in one C++ call. `make_runner` picks one."""
from __future__ import annotations

from typing import Protocol

import torch

from ..kernels import _native, ops
from .batch import StepBatch
from .config import EngineConfig
from .kv_cache import PagedKVCache


class Runner(Protocol):
    cfg: object                  # the model's ModelConfig
    kv_dtype: torch.dtype        # the KV cache dtype this runner prefers
    max_step_tokens: int         # the step budget whose results are still batch invariant
    prefill_chunk: int           # tokens per step for one prompt run alone (bounded scratch)

    def run(self, step: StepBatch, kv: PagedKVCache) -> torch.Tensor: ...


class PagedAttention:
    """The attention context (positions / attend / advance, as models call it) of one step: each
    sequence's new K/V go into its blocks of the paged cache, and its queries attend over its
    cached positions. With the native module, fp32 queries and no soft-capping or sliding window,
    attention runs one query row at a time through the native decode kernel, so a row's result
    does not depend on how the rows are chunked or batched; otherwise through ops.attention."""

    def __init__(self, kv: PagedKVCache, step: StepBatch):
        self.kv, self.step = kv, step
        self._slots = None

    def positions(self, num_new: int) -> torch.Tensor:
        s = self.step
        assert num_new == s.num_tokens
        if s.num_seqs == 1:
            return torch.arange(s.start_positions[0], s.start_positions[0] + num_new)
        return torch.cat([torch.arange(a, a + n) for a, n in zip(s.start_positions, s.query_lens)])

    def _seq_slots(self) -> list:
        """Per sequence: (block table, block ids, offsets) of its new positions, built once a step."""
        if self._slots is None:
            bs, s = self.kv.block_size, self.step
            self._slots = []
            for table, start, n in zip(s.block_tables, s.start_positions, s.query_lens):
                t = torch.tensor(table, dtype=torch.long)
                pos = torch.arange(start, start + n)
                self._slots.append((t, t[pos // bs], pos % bs))
        return self._slots

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               softcap: float | None, window: int | None) -> torch.Tensor:
        # q: [1, H, N, D], k/v: [1, Hkv, N, D], sequences back to back
        kv, s = self.kv, self.step
        hkv, d, bs = kv.k[layer].shape[1], kv.cfg.head_dim, kv.block_size
        K = _native.K
        invariant = K is not None and softcap is None and window is None and q.dtype is torch.float32
        if invariant:
            h = q.shape[1]
            qr = q[0].transpose(0, 1).contiguous()                  # [N, H, D]
            out = torch.empty_like(qr)
            row_bytes = h * d * 4
        outs, off = [], 0
        for (table, blocks, offsets), start, n in zip(self._seq_slots(), s.start_positions, s.query_lens):
            kv.write(layer, blocks, offsets, k[0, :, off:off + n].transpose(0, 1), v[0, :, off:off + n].transpose(0, 1))
            nb = -(-(start + n) // bs)
            # [Hkv, nb * bs, D], contiguous (the gather copies)
            kc = kv.k[layer][table[:nb]].transpose(0, 1).reshape(hkv, nb * bs, d)
            vc = kv.v[layer][table[:nb]].transpose(0, 1).reshape(hkv, nb * bs, d)
            if invariant:
                kc, vc = kc.float(), vc.float()
                qp, op = qr.data_ptr() + off * row_bytes, out.data_ptr() + off * row_bytes
                for i in range(n):
                    K.attn_decode(qp + i * row_bytes, kc.data_ptr(), vc.data_ptr(), op + i * row_bytes,
                                  h, hkv, d, start + i + 1, nb * bs, float(scale))
            else:
                qi = q[:, :, off:off + n]
                kc, vc = kc[None, :, :start + n].to(qi.dtype), vc[None, :, :start + n].to(qi.dtype)
                outs.append(ops.attention(qi, kc, vc, ops.attention_mask(n, start, window), scale, softcap))
            off += n
        if invariant:
            return out.transpose(0, 1)[None]                        # [1, H, N, D]
        return torch.cat(outs, dim=2)

    def advance(self, num_new: int) -> None:
        """Bookkeeping is the scheduler's: it reserved the positions before the step."""


class TorchRunner:
    """The reference model (models/) over the paged cache: every linear runs on the native kernel
    (`ops.linear`, whose rows do not depend on the number of rows up to ops.F32_NATIVE_MAX_M,
    hence the step budget) and attention through PagedAttention."""

    kv_dtype = torch.float32

    def __init__(self, model):
        self.model = model
        self.cfg = model.cfg
        self.max_step_tokens = ops.F32_NATIVE_MAX_M if ops.native_available() else 256
        self.prefill_chunk = self.max_step_tokens

    @torch.inference_mode()
    def run(self, step: StepBatch, kv: PagedKVCache) -> torch.Tensor:
        tokens = torch.tensor([step.token_ids])
        rows = step.logit_rows
        ctx = PagedAttention(kv, step)
        if not rows:
            self.model.forward(tokens, ctx, logits_index=torch.tensor([step.num_tokens - 1]))
            return torch.empty(0, self.cfg.vocab_size)
        return self.model.forward(tokens, ctx, logits_index=torch.tensor(rows))[0]


def make_runner(model, native: bool | None = None):
    """RecurrentRunner (recurrent.py) for a recurrent model; NativeRunner when the model is
    supported natively (and `native` is not False), else TorchRunner."""
    from .native_runner import NativeRunner, supported

    if getattr(model, "RECURRENT", False):
        from .recurrent import RecurrentRunner

        return RecurrentRunner(model)
    if native is not False and supported(model) is None:
        return NativeRunner(model)
    return TorchRunner(model)


def resolve_kv_dtype(runner, kv_dtype: torch.dtype | str | None) -> torch.dtype:
    """The KV cache dtype: as given ('f16' / 'f32' / a torch dtype), or for None / 'auto' the
    runner's own preference (the native step: fp16 for quantized weights unless `--precise`;
    fp32 otherwise)."""
    return EngineConfig(kv_dtype=kv_dtype).resolve_kv_dtype(getattr(runner, "kv_dtype", torch.float32))


@torch.inference_mode()
def sequence_logits(runner, token_ids: list[int], *, kv_dtype: torch.dtype | None = None,
                    chunk: int | None = None) -> torch.Tensor:
    """Logits [T, V] at every position of one sequence scored from an empty cache (perplexity,
    reference comparisons), `chunk` tokens per step (default: the runner's prefill_chunk)."""
    T = len(token_ids)
    kv = PagedKVCache(runner.cfg, 1, max(1, T), dtype=kv_dtype or resolve_kv_dtype(runner, None),
                      resident=False)
    chunk = chunk or runner.prefill_chunk
    out = None
    for p0 in range(0, T, chunk):
        part = token_ids[p0:p0 + chunk]
        logits = runner.run(StepBatch.single(part, p0, [0], list(range(len(part)))), kv)
        if out is None:
            out = logits if len(part) == T else torch.empty(T, logits.shape[-1])
        if out is not logits:
            out[p0:p0 + len(part)] = logits
    return out
