"""RecurrentRunner: a recurrent model (jisu.models.lstm) run by the engine. The paged KV cache holds,
per layer and position, the state after that position's token (h in the K half, c in the V half), so
prefix caching, forks, rollback of drafts and preemption work for it as they do for K/V."""
from __future__ import annotations

import torch

from .batch import StepBatch
from .kv_cache import PagedKVCache

_F32 = torch.float32


class RecurrentRunner:
    """run(step, kv) -> logits [R, V]. A step's sequences are advanced together: per layer, the input
    gates of all the step's tokens in one linear, then one time step after another over the rows
    of the sequences still in their chunk (W_hh x h of those rows in one linear). The linears are
    the kernels' packed ones (ops.linear) and the gate math is torch's; every row is computed on its
    own, so a sequence's tokens do not depend on what it is batched with or how its prompt is
    chunked. A state is stored rounded to the cache's dtype and the recurrence always continues from
    the rounded value, so an f16 cache changes the numbers but not that invariance."""

    kv_dtype = _F32

    def __init__(self, model):
        self.model = model
        self.cfg = model.cfg
        self.rt = model.runtime()
        self.max_step_tokens = 256
        self.prefill_chunk = 64

    @torch.inference_mode()
    def run(self, step: StepBatch, kv: PagedKVCache) -> torch.Tensor:
        rt, cfg = self.rt, self.cfg
        L, H, bs = cfg.num_layers, cfg.head_dim, kv.block_size
        lens, starts = step.query_lens, step.start_positions
        # where each token's state goes, and where each sequence's previous state lies
        blocks, offsets, prev = [], [], []
        for table, start, n in zip(step.block_tables, starts, lens):
            for p in range(start, start + n):
                blocks.append(table[p // bs])
                offsets.append(p % bs)
            prev.append((table[(start - 1) // bs], (start - 1) % bs) if start > 0 else None)
        blocks_t, offsets_t = torch.tensor(blocks), torch.tensor(offsets)
        firsts = [0]
        for n in lens[:-1]:
            firsts.append(firsts[-1] + n)
        x = rt.embed_rows(torch.tensor(step.token_ids, dtype=torch.long))            # [N, D]
        rounded = kv.k[0].dtype != _F32
        for layer in range(L):
            h, c = self._initial_state(kv, layer, prev, H)                          # [S, H] each
            gx = rt.input_gates(layer, x)                                           # [N, 4H]
            if max(lens) == 1:  # decode: one token per sequence, rows in sequence order
                out_h, out_c = rt.cell(layer, gx, h, c)
                if rounded:
                    out_h, out_c = _rounded(out_h, kv), _rounded(out_c, kv)
            else:
                out_h, out_c = self._chunks(layer, gx, h, c, lens, firsts, kv if rounded else None)
            kv.k[layer][blocks_t, 0, offsets_t] = out_h.to(kv.k[layer].dtype)
            kv.v[layer][blocks_t, 0, offsets_t] = out_c.to(kv.v[layer].dtype)
            x = out_h
        if not step.logit_rows:
            return torch.empty(0, cfg.vocab_size)
        return rt.logits(x.index_select(0, torch.tensor(step.logit_rows)))

    def _chunks(self, layer: int, gx: torch.Tensor, h: torch.Tensor, c: torch.Tensor, lens: list, firsts: list,
                kv: PagedKVCache | None):
        """(h, c) [N, H] of every token of chunks of several tokens: time step t advances the rows of
        the sequences whose chunk is longer than t. kv: round each state to its dtype."""
        rt, H = self.rt, self.cfg.head_dim
        out_h, out_c = torch.empty(gx.shape[0], H), torch.empty(gx.shape[0], H)
        for t in range(max(lens)):
            active = [s for s, n in enumerate(lens) if n > t]
            rows = torch.tensor([firsts[s] + t for s in active])
            if len(active) == len(lens):
                hs, cs = rt.cell(layer, gx.index_select(0, rows), h, c)
                if kv is not None:
                    hs, cs = _rounded(hs, kv), _rounded(cs, kv)
                h, c = hs, cs
            else:
                sel = torch.tensor(active)
                hs, cs = rt.cell(layer, gx.index_select(0, rows), h.index_select(0, sel), c.index_select(0, sel))
                if kv is not None:
                    hs, cs = _rounded(hs, kv), _rounded(cs, kv)
                h, c = h.index_copy(0, sel, hs), c.index_copy(0, sel, cs)
            out_h.index_copy_(0, rows, hs)
            out_c.index_copy_(0, rows, cs)
        return out_h, out_c

    @staticmethod
    def _initial_state(kv: PagedKVCache, layer: int, prev: list, H: int):
        """(h, c) [S, H] each: the state each sequence's previous position left (zeros at position 0)."""
        h, c = torch.zeros(len(prev), H), torch.zeros(len(prev), H)
        have = [s for s, p in enumerate(prev) if p is not None]
        if have:
            b = torch.tensor([prev[s][0] for s in have])
            o = torch.tensor([prev[s][1] for s in have])
            sel = torch.tensor(have)
            h.index_copy_(0, sel, kv.k[layer][b, 0, o].to(_F32))
            c.index_copy_(0, sel, kv.v[layer][b, 0, o].to(_F32))
        return h, c


def _rounded(t: torch.Tensor, kv: PagedKVCache) -> torch.Tensor:
    return t.to(kv.k[0].dtype).to(_F32)

