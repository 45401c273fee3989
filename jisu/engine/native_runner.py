"""NativeRunner: a Llama-family or Gemma 2/3 model run by jisu._kernels.NativeModel
(cpu/llama_step.cpp), which computes a whole step - all layers, attention over the paged KV cache,
the LM head - in one call, so a decoded token costs one Python -> C++ crossing instead of ~15 per layer.

At build time q|k|v and gate|up of each layer are joined into one packed matrix (one pass over
the activations, fewer thread-pool jobs); the model's own weights become views of the joined
buffers, so memory is not duplicated and the reference model still runs on the same bytes."""
from __future__ import annotations

import weakref
from array import array
from typing import Optional

import torch

from ..config import archs
from ..kernels import _native, ops
from ..kernels.lowrank import PackedLowRank
from ..kernels.packed import PackedF32, PackedWeight, can_concat_rows, concat_rows
from ..memory import HugePageArena, collapse_huge, file_mappings, huge_pages_on, mapping_holding, release_mapped, trim_heap
from ..models.gemma import GemmaModel
from ..models.llama import LlamaModel
from .batch import StepBatch
from .kv_cache import PagedKVCache

_F32 = torch.float32


def _as_packed(w) -> PackedWeight:
    if isinstance(w, PackedWeight):
        return w
    return PackedF32(w)  # a contiguous fp32 tensor is used in place


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=_F32).contiguous()


# the model classes the step runs, and the MLP activation each computes
_ACTIVATION = {LlamaModel: "silu", GemmaModel: "gelu_tanh"}


def _activation(model) -> Optional[str]:
    return next((a for c, a in _ACTIVATION.items() if isinstance(model, c)), None)


def _required(model) -> list[str]:
    """The weights the step reads: every layer's linears and norms, the embedding, head and final norm."""
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    for i, n in enumerate(model.names):
        names += [n[s][0] for s in ("q", "k", "v", "o", "gate", "up", "down")]
        names += [n[k] for k in ("attn_norm", "mlp_norm", "attn_post", "mlp_post") if n[k]]
        if model.cfg.qk_norm:
            names += [n["q_norm"], n["k_norm"]]
    return names


def supported(model) -> Optional[str]:
    """None if NativeRunner can run `model`, else the reason it cannot."""
    if _native.K is None or not hasattr(_native.K, "NativeModel"):
        return "the native module jisu._kernels is not built"
    act = _activation(model)
    if act is None:
        return f"{type(model).__name__} is not a Llama-family or Gemma model"
    cfg = model.cfg
    if not archs()[cfg.arch].NATIVE or cfg.hidden_act != act:
        return f"architecture {cfg.arch} ({cfg.hidden_act}) is not supported natively"
    if cfg.head_dim % 2:
        return "odd head_dim"
    if set(model.rotaries) - {"full", "sliding"} or set(model.layer_kinds) - set(model.rotaries):
        return f"layer kinds {sorted(set(model.layer_kinds))} are not supported natively"
    missing = next((n for n in _required(model) if n not in model.w), None)
    if missing:
        return f"the model has no {missing}"
    for name, w in model.w.items():
        if isinstance(w, PackedLowRank) and (w.base is None or not hasattr(_native.K.NativeModel, "set_lowrank")):
            return f"{name} is a low-rank product without a native base weight"
        if isinstance(w, PackedWeight):
            if w.data.device.type != "cpu" or not w._addr:
                return f"{name} is not a CPU packed weight"
        elif isinstance(w, torch.Tensor):
            if w.device.type != "cpu":
                return f"{name} is not on the CPU"
        else:
            return f"{name} has an unknown type {type(w).__name__}"
    return None


class NativeRunner:
    """A LlamaModel's or GemmaModel's steps in one native call each (see the module docstring)."""

    # the step's results never depend on how many tokens it holds, so the budget is a throughput
    # choice: 256 for the engine's mixed batches
    max_step_tokens = 256
    # one prompt alone goes in steps of this many tokens: the step's scratch grows with its tokens
    # (~140 KB a token at 1.5B shapes, ~240 KB at 8B), and a bigger step spreads each weight panel's
    # decoding and the step's per-layer synchronisation over more tokens. Measured (256-token prompt,
    # 2 threads): 256 against 64 was 1.18x faster on the default model, 1.07-1.14x on a 1.5B Q4_K_M and
    # 1.12-1.2x on a 3B one; 128 was as fast as 256 on the 1.5B file with ~40 MB less peak memory
    prefill_chunk = 128
    # weight matrices totalling at least this many bytes go into a huge-page arena: fp32 ones
    # always (they are converted anyway), packed ones where transparent huge pages are on
    # (memory.huge_pages_on; JISU_HUGE_PAGES=0 keeps them where they are). A GGUF's weights are
    # then copied out of the file mapping, whose pages are released, so resident memory stays the
    # weights' bytes: measured (2 threads, decode of 56 tokens), a 3B Q4_K_M 7.3-7.6 -> 9.3-9.5
    # tok/s and a 1.5B Q4_K_M 16.8-16.9 -> 21.4-21.6 (4 KB pages of the file mapping or of the
    # heap: 7.3-7.6; the step streams the weights, and every 4 KB page costs a TLB miss and stops
    # the hardware prefetchers)
    arena_min_bytes = 8 << 20

    def __init__(self, model):
        why = supported(model)
        if why:
            raise ValueError(f"NativeRunner: {why}")
        self.model = model
        self.cfg = cfg = model.cfg
        w = model.w
        self._keep: list = []  # every tensor / packed weight the handle points into

        def keep(x):
            self._keep.append(x)
            return x

        def norm(name: str) -> int:
            return keep(_f32(w[name])).data_ptr()

        self._quantized = any(isinstance(x, PackedWeight) and not isinstance(x, PackedF32) for x in w.values())
        self._arena = self._weight_arena(w)
        gemma = isinstance(model, GemmaModel)
        kinds = sorted(model.rotaries, key=lambda k: k != "full")  # table 0: the full layers' RoPE
        inv_freq = [keep(_f32(model.rotaries[k].inv_freq)) for k in kinds]
        # the largest MLP width and head counts size the step's buffers; set_layer gives each layer its own
        L = range(cfg.num_layers)
        self.handle = _native.K.NativeModel(cfg.hidden_size, max(map(cfg.mlp_width, L)), cfg.num_layers,
                                            max(cfg.heads(i)[0] for i in L), max(cfg.heads(i)[1] for i in L),
                                            cfg.head_dim, cfg.vocab_size, float(cfg.rms_norm_eps),
                                            float(model.scale), inv_freq[0].data_ptr(), activation=_activation(model),
                                            attn_softcap=float(model.attn_softcap or 0.0))
        rope_index = {kinds[0]: 0}
        for k, f in zip(kinds[1:], inv_freq[1:]):
            rope_index[k] = self.handle.add_rope(f.data_ptr())
        self.fused = []
        qkv_group, gu_group = model.fused_groups()  # q|k|v and gate|up, fused where their layouts allow
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            heads, kv_heads = cfg.heads(i)
            qkv = self._group(w, [p + n + ".weight" for n in qkv_group])
            biases = [w.get(p + n + ".bias") for n in qkv_group]
            if len(qkv) == 1:
                if any(b is not None for b in biases):
                    sizes = (heads * cfg.head_dim, kv_heads * cfg.head_dim, kv_heads * cfg.head_dim)
                    bias = torch.cat([_f32(b) if b is not None else torch.zeros(n) for b, n in zip(biases, sizes)])
                    bias_ptrs = [keep(bias).data_ptr()]
                else:
                    bias_ptrs = [0]
            else:
                bias_ptrs = [keep(_f32(b)).data_ptr() if b is not None else 0 for b in biases]
            gu = self._group(w, [p + n + ".weight" for n in gu_group])
            o = keep(self._packed(w, p + "self_attn.o_proj.weight"))
            down = keep(self._packed(w, p + "mlp.down_proj.weight"))
            names = model.names[i]
            qn = kn = 0
            if cfg.qk_norm:
                qn, kn = norm(names["q_norm"]), norm(names["k_norm"])
            kind = model.layer_kinds[i]
            self.handle.set_layer(i, [keep(x)._addr for x in qkv], bias_ptrs, o._addr, [keep(x)._addr for x in gu],
                                  down._addr, norm(names["attn_norm"]), norm(names["mlp_norm"]), qn, kn,
                                  int(model.windows[kind] or 0), rope=rope_index[kind],
                                  attn_post_norm=norm(names["attn_post"]) if names["attn_post"] else 0,
                                  mlp_post_norm=norm(names["mlp_post"]) if names["mlp_post"] else 0,
                                  intermediate=cfg.mlp_width(i), num_heads=heads, num_kv_heads=kv_heads)
            for x in (*qkv, o, *gu, down):  # low-rank terms, run fused after their linear (cpu/lowrank.h)
                if isinstance(x, PackedLowRank):
                    self.handle.set_lowrank(**x.native_args())
        emb = w["model.embed_tokens.weight"]
        tied = w["lm_head.weight"] is emb
        head = None
        if isinstance(emb, PackedWeight):
            emb_f32, emb_desc = 0, keep(self._into_arena(emb))._addr
        else:
            e = keep(self._arena.take(_f32(emb)) if self._arena is not None else _f32(emb))
            if self._arena is not None:
                w["model.embed_tokens.weight"] = e
                if tied:
                    w["lm_head.weight"] = e
            emb_f32, emb_desc = e.data_ptr(), 0
            if tied:
                head = _as_packed(e)
        head = keep(head if head is not None else self._packed(w, "lm_head.weight"))
        self.handle.set_globals(emb_f32, emb_desc, head._addr, norm("model.norm.weight"),
                                embed_scale=float(cfg.embed_scale) if gemma and cfg.embed_scale else 1.0,
                                final_softcap=float(cfg.final_softcap or 0.0) if gemma else 0.0)
        if self.fused or self._arena is not None:
            trim_heap()  # the parts' old buffers (now copied into the joined ones or the arena)
        self._kv_ref = self._kv_ptrs = None

    # -- building -----------------------------------------------------------------------------
    def _linear_names(self) -> list[str]:
        names = []
        for i in range(self.cfg.num_layers):
            p = f"model.layers.{i}."
            names += [p + f"self_attn.{n}_proj.weight" for n in "qkvo"]
            names += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
        return names + ["model.embed_tokens.weight", "lm_head.weight"]

    def _weight_arena(self, w: dict) -> Optional[HugePageArena]:
        """A huge-page arena for the weight matrices (see arena_min_bytes), or None."""
        self._move_packed = huge_pages_on()
        seen, total = set(), 0
        for n in self._linear_names():
            t = w.get(n)
            if id(t) in seen:
                continue
            seen.add(id(t))
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                total += HugePageArena.round_up(t.numel() * 4)  # as fp32
            elif self._move_packed and isinstance(t, PackedWeight) and not isinstance(t, PackedF32):
                base = t.base if isinstance(t, PackedLowRank) else t  # a low-rank base joins through the arena
                if base is not None and base.data.device.type == "cpu":
                    total += HugePageArena.size_of(base.data)
        if not total or total < self.arena_min_bytes:
            return None
        self._file_maps = file_mappings() if self._move_packed else []
        return HugePageArena(total)

    def _into_arena(self, p: PackedWeight) -> PackedWeight:
        """p on huge pages (where packed weights go there, see arena_min_bytes): bytes in a file
        mapping are copied into the arena a slice at a time, each slice's file pages released; a
        buffer of its own (repacked at load) is collapsed into huge pages in place (no copy, so
        no second buffer of its size at any time)."""
        if (self._arena is None or not self._move_packed or isinstance(p, (PackedF32, PackedLowRank))
                or p.data.device.type != "cpu" or self._arena.holds(p.data)):
            return p
        old = p.data
        mapping = mapping_holding(old.data_ptr(), self._file_maps)
        if mapping is None:
            collapse_huge(old.data_ptr(), old.numel() * old.element_size())
            return p
        new = self._arena.empty(old.shape, old.dtype)
        src, dst = old.reshape(-1).view(torch.uint8), new.reshape(-1).view(torch.uint8)
        step = 16 << 20  # a slice at a time, its file pages released: the peak stays the weights' bytes
        for a in range(0, src.numel(), step):
            dst[a:a + step].copy_(src[a:a + step])
            part = src[a:a + step]
            release_mapped(part.data_ptr(), part.numel(), mapping)
        p.data = new
        p._attach()
        return p

    def _packed(self, w: dict, name: str) -> PackedWeight:
        """w[name] as a packed weight in the arena (see arena_min_bytes); an fp32 tensor is moved
        there (and w[name] becomes that copy, so the old bytes are freed)."""
        t = w[name]
        if isinstance(t, torch.Tensor) and self._arena is not None and t.device.type == "cpu":
            t = w[name] = self._arena.take(_f32(t))
        return self._into_arena(_as_packed(t))

    def _group(self, w: dict, names: list[str]) -> list[PackedWeight]:
        """The packed weights for `names`, joined into one when their layouts allow."""
        parts = [_as_packed(w[n]) for n in names]
        if not can_concat_rows(parts):
            return [self._packed(w, n) for n in names]
        to_arena = isinstance(parts[0], PackedF32) or self._move_packed
        fused = concat_rows(parts, self._arena if to_arena else None)
        for n, p in zip(names, parts):
            if isinstance(w[n], torch.Tensor):  # an fp32 model: its tensors become views too
                w[n] = p.data
        self.fused.append(fused)
        return [fused]

    # -- running ------------------------------------------------------------------------------
    @property
    def kv_dtype(self) -> torch.dtype:
        """The KV cache dtype by default: fp16 for quantized weights (half the bytes attention
        reads, as llama.cpp's default cache; its rounding, ~5e-4 relative, is far below that of the
        int8 activations), fp32 for fp32 weights and under `--precise`, whose point is the
        reference path's own numbers."""
        return _F32 if ops.is_precise() or not self._quantized else torch.float16

    def profile(self, on: bool = True) -> None:
        """Time the native step's parts (see stats())."""
        self.handle.profile = on

    def stats(self) -> dict:
        return self.handle.stats()

    def _ptrs(self, kv: PagedKVCache):
        """(k pointer array, v pointer array, half) of the cache's per-layer tensors, built once per
        cache (a weak reference tells it is the same cache: a new one can reuse a freed one's id and
        some of its addresses)."""
        if self._kv_ref is None or self._kv_ref() is not kv:
            if kv.k[0].dtype not in (_F32, torch.float16) or kv.k[0].device.type != "cpu":
                raise ValueError(f"the native step needs a CPU float32 or float16 cache, not {kv.k[0].dtype}")
            self._kv_ptrs = (array("q", [t.data_ptr() for t in kv.k]), array("q", [t.data_ptr() for t in kv.v]),
                             kv.k[0].dtype == torch.float16)
            self._kv_ref = weakref.ref(kv)
        return self._kv_ptrs

    def run(self, step: StepBatch, kv: PagedKVCache) -> torch.Tensor:
        """The step's logits rows [R, V] (R = len(step.logit_rows))."""
        # a decode step's Python cost: build only the arrays the call reads (no tensors but `out`)
        N, S, bs = len(step.token_ids), len(step.query_lens), kv.block_size
        kp, vp, half = self._ptrs(kv)
        tables = step.block_tables
        if S == 1:
            maxb = max(1, len(tables[0]))
            flat = array("i", tables[0]) if tables[0] else array("i", [0])
            fits = step.start_positions[0] + N <= len(tables[0]) * bs
        else:
            maxb = max(1, max(len(t) for t in tables))
            flat = array("i", [0]) * (S * maxb)
            for i, t in enumerate(tables):
                flat[i * maxb:i * maxb + len(t)] = array("i", t)
            fits = all(a + n <= len(t) * bs for a, n, t in zip(step.start_positions, step.query_lens, tables))
        if not fits:
            raise ValueError("KV cache full: a sequence's block table does not cover its new positions")
        tok = array("q", step.token_ids)
        rows = array("i", step.logit_rows)
        R = len(rows)
        out = torch.empty((R, self.cfg.vocab_size), dtype=_F32)
        qlens = array("i", step.query_lens)
        starts = array("i", step.start_positions)
        self.handle.forward(tok.buffer_info()[0], N, S, qlens.buffer_info()[0], starts.buffer_info()[0],
                            flat.buffer_info()[0], maxb, kp.buffer_info()[0], vp.buffer_info()[0],
                            bs, kv.pool.num_blocks, rows.buffer_info()[0], R, out.data_ptr(), half)
        return out
