"""The native forward step for the Llama family: `accelerate(model)` wraps a LlamaModel (fp32
tensors or packed kernel weights) in NativeLlama, which runs a whole step - all layers,
attention over the (static or paged) KV cache, the LM head - in one call into jisu._kernels
(cpu/forward.cpp), so a decoded token costs one Python -> C++ crossing instead of ~15 per layer.

NativeLlama has the reference model's interface (cfg, w, new_cache, forward(tokens, cache,
logits_index)) and takes both cache kinds: a static layers.KVCache [B, Hkv, max_len, D] is the
paged layout with block_size = max_len and block table [b] for batch row b (no copy), and an
engine PagedBatch passes its pool and block tables.

At build time q|k|v and gate|up of each layer are fused into one packed matrix (one pass over
the activations, fewer thread-pool jobs); the model's own weights become views of the fused
buffers, so memory is not duplicated and the reference model still runs on the same bytes.
"""
from __future__ import annotations

from array import array
from typing import Optional

import torch

from ..config import archs
from ..memory import HugePageArena, trim_heap
from . import _native
from .packed import PackedCodebook, PackedF32, PackedInt, PackedWeight

_F32 = torch.float32
NR = 8


# ----------------------------------------------------------------------------- helpers
def packed_rows(weight: PackedWeight, tokens: torch.Tensor) -> torch.Tensor:
    """Rows `tokens` (any shape) of a packed [V, K] weight, dequantized -> [*tokens.shape, K] fp32."""
    ids = tokens.to(torch.int64).contiguous()
    if weight._addr and _native.K is not None:
        out = torch.empty(*ids.shape, weight.K, dtype=_F32)
        _native.K.dequant_rows(weight._addr, ids.data_ptr(), ids.numel(), out.data_ptr())
        return out
    if weight._dense_cache is None:
        weight._dense_cache = weight.dequantize()
    return weight._dense_cache.to("cpu")[ids]


def _as_packed(w) -> PackedWeight:
    if isinstance(w, PackedWeight):
        return w
    return PackedF32(w)  # a contiguous fp32 tensor is used in place


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=_F32).contiguous()


def _fusable(parts: list) -> bool:
    """Same packed kind and layout, and every part but the last a whole number of 8-row tiles."""
    a = parts[0]
    if any(p.N % NR for p in parts[:-1]) or any(type(p) is not type(a) or p.K != a.K for p in parts):
        return False
    if isinstance(a, PackedInt):
        return all((p.bits, p.asym, p.per_channel, p.group) == (a.bits, a.asym, a.per_channel, a.group)
                   for p in parts)
    if isinstance(a, PackedCodebook):
        return all(p.group == a.group for p in parts)
    return isinstance(a, PackedF32)


def fuse_rows(parts: list[PackedWeight], arena: Optional[HugePageArena] = None) -> PackedWeight:
    """One packed weight with the rows of `parts` stacked; each part's buffers become views of
    the fused ones (no memory is duplicated, and the parts keep working on their own). The fused
    bytes are carved from `arena` when one is given."""
    a = parts[0]
    fused = object.__new__(type(a))
    fused.__dict__.update({k: v for k, v in a.__dict__.items() if k not in ("_desc", "_addr", "_dense_cache")})
    fused.N = sum(p.N for p in parts)
    datas = [p.data for p in parts]
    if arena is not None:
        out = arena.empty((sum(d.shape[0] for d in datas),) + tuple(datas[0].shape[1:]), datas[0].dtype)
        fused.data = torch.cat(datas, 0, out=out)
    else:
        fused.data = torch.cat(datas, 0)
    cs = getattr(a, "chan_scale", None)
    if cs is not None:
        fused.chan_scale = torch.cat([p.chan_scale for p in parts], 0)
    fused._attach()
    off = coff = 0
    for p in parts:
        n = p.data.shape[0]
        p.data = fused.data[off:off + n]
        off += n
        if cs is not None:
            m = p.chan_scale.shape[0]
            p.chan_scale = fused.chan_scale[coff:coff + m]
            coff += m
        p._attach()
    return fused


def supported(model) -> Optional[str]:
    """None if NativeLlama can run `model`, else the reason it cannot."""
    from ..models.llama import LlamaModel

    if _native.K is None or not hasattr(_native.K, "NativeModel"):
        return "the native module jisu._kernels is not built"
    if not isinstance(model, LlamaModel):
        return f"{type(model).__name__} is not a Llama-family model"
    cfg = model.cfg
    if not archs()[cfg.arch].NATIVE or cfg.hidden_act != "silu":
        return f"architecture {cfg.arch} ({cfg.hidden_act}) is not supported natively"
    if cfg.intermediate_sizes or cfg.layer_heads:
        return "layers of different widths are not supported natively"
    if cfg.head_dim % 2:
        return "odd head_dim"
    if cfg.attn_softcap or cfg.final_softcap:
        return "soft-capping is not supported natively"
    for name, w in model.w.items():
        if isinstance(w, PackedWeight):
            if w.data.device.type != "cpu" or not w._addr:
                return f"{name} is not a CPU packed weight"
        elif isinstance(w, torch.Tensor):
            if w.device.type != "cpu":
                return f"{name} is not on the CPU"
        else:
            return f"{name} has an unknown type {type(w).__name__}"
    return None


# ----------------------------------------------------------------------------- the model
class NativeLlama:
    """A LlamaModel run by jisu._kernels.NativeModel (see the module docstring)."""

    # generate() feeds a prompt this many tokens per step: the step's scratch grows with the tokens
    # in it (a 4k-token prompt in one call would take ~100 MB), and GEMM throughput is already flat
    # from M = 64; rows never depend on how many are computed together, so results are unchanged
    prefill_chunk = 64
    # fp32 weight matrices totalling at least this many bytes go into a huge-page arena
    arena_min_bytes = 8 << 20

    def __init__(self, model):
        why = supported(model)
        if why:
            raise ValueError(f"NativeLlama: {why}")
        self.model = model
        self.cfg = cfg = model.cfg
        w = model.w
        K = _native.K
        self._keep: list = []  # every tensor / packed weight the handle points into

        def keep(x):
            self._keep.append(x)
            return x

        def norm(name: str) -> int:
            return keep(_f32(w[name])).data_ptr()

        self._quantized = any(isinstance(x, PackedWeight) and not isinstance(x, PackedF32) for x in w.values())
        self._arena = self._weight_arena(w)
        inv_freq = keep(_f32(model.rotary.inv_freq))
        self.handle = K.NativeModel(cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
                                    cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, float(cfg.rms_norm_eps),
                                    float(model.scale), inv_freq.data_ptr())
        window = cfg.sliding_window if cfg.layer_types else None  # as LlamaModel.forward
        self.fused = []
        qkv_group, gu_group = archs()[cfg.arch].LINEAR_GROUPS  # q|k|v and gate|up, fused where they can be
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            qkv = self._group(w, [p + n + ".weight" for n in qkv_group])
            biases = [w.get(p + n + ".bias") for n in qkv_group]
            if len(qkv) == 1:
                if any(b is not None for b in biases):
                    sizes = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                             cfg.num_kv_heads * cfg.head_dim)
                    bias = torch.cat([_f32(b) if b is not None else torch.zeros(n) for b, n in zip(biases, sizes)])
                    bias_ptrs = [keep(bias).data_ptr()]
                else:
                    bias_ptrs = [0]
            else:
                bias_ptrs = [keep(_f32(b)).data_ptr() if b is not None else 0 for b in biases]
            gu = self._group(w, [p + n + ".weight" for n in gu_group])
            o = keep(self._packed(w, p + "self_attn.o_proj.weight"))
            down = keep(self._packed(w, p + "mlp.down_proj.weight"))
            qn = kn = 0
            if cfg.qk_norm:
                qn, kn = norm(p + "self_attn.q_norm.weight"), norm(p + "self_attn.k_norm.weight")
            self.handle.set_layer(i, [keep(x)._addr for x in qkv], bias_ptrs, o._addr, [keep(x)._addr for x in gu],
                                  down._addr, norm(p + "input_layernorm.weight"),
                                  norm(p + "post_attention_layernorm.weight"), qn, kn, int(window or 0))
        emb = w["model.embed_tokens.weight"]
        tied = w["lm_head.weight"] is emb
        head = None
        if isinstance(emb, PackedWeight):
            emb_f32, emb_desc = 0, keep(emb)._addr
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
        self.handle.set_globals(emb_f32, emb_desc, head._addr, norm("model.norm.weight"))
        if self.fused or self._arena is not None:
            trim_heap()  # the parts' old buffers (now copied into the fused ones or the arena)

    def _linear_names(self) -> list[str]:
        names = []
        for i in range(self.cfg.num_layers):
            p = f"model.layers.{i}."
            names += [p + f"self_attn.{n}_proj.weight" for n in "qkvo"]
            names += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
        return names + ["model.embed_tokens.weight", "lm_head.weight"]

    def _weight_arena(self, w: dict) -> Optional[HugePageArena]:
        """A huge-page arena for the fp32 weight matrices, when the model has them as tensors."""
        seen, total = set(), 0
        for n in self._linear_names():
            t = w.get(n)
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and id(t) not in seen:
                seen.add(id(t))
                total += HugePageArena.round_up(t.numel() * 4)  # as fp32
        return HugePageArena(total) if total and total >= self.arena_min_bytes else None

    def _packed(self, w: dict, name: str) -> PackedWeight:
        """w[name] as a packed weight; an fp32 tensor is first moved into the arena (and w[name]
        becomes that copy, so the old bytes are freed)."""
        t = w[name]
        if isinstance(t, torch.Tensor) and self._arena is not None and t.device.type == "cpu":
            t = w[name] = self._arena.take(_f32(t))
        return _as_packed(t)

    def _group(self, w: dict, names: list[str]) -> list[PackedWeight]:
        """The packed weights for `names`, fused into one when their layouts allow."""
        parts = [_as_packed(w[n]) for n in names]
        if not _fusable(parts):
            return [self._packed(w, n) for n in names]
        fused = fuse_rows(parts, self._arena if isinstance(parts[0], PackedF32) else None)
        for n, p in zip(names, parts):
            if isinstance(w[n], torch.Tensor):  # an fp32 model: its tensors become views too
                w[n] = p.data
        self.fused.append(fused)
        return [fused]

    # -- the reference model's interface --------------------------------------------------
    @property
    def w(self) -> dict:
        return self.model.w

    def __getattr__(self, name):  # rotary, scale, ... of the wrapped model
        return getattr(self.__dict__["model"], name)

    @property
    def kv_dtype(self) -> torch.dtype:
        """The KV cache dtype this model gets by default: fp16 for quantized weights (half the bytes
        attention reads, as llama.cpp's default cache; its rounding, ~5e-4 relative, is far below
        that of the int8 activations), fp32 for fp32 weights and under `--precise`, whose point
        is the reference path's own numbers."""
        from . import ops

        return _F32 if ops.is_precise() or not self._quantized else torch.float16

    def new_cache(self, batch: int, max_len: int, dtype: Optional[torch.dtype] = None):
        """A static KVCache in `dtype` (default: kv_dtype). On the CPU its tensors are views of one
        anonymous mapping (layers.zeroed_tensors): zero pages the kernel hands out as positions are
        written, so there is no fill to pay for (torch's zero fill runs on its OpenMP pool: ~0.5 s
        per generate call on a busy machine) and the cache's memory leaves RSS when it is freed."""
        from ..models.layers import KVCache

        return KVCache(self.cfg, batch, max_len, dtype=dtype or self.kv_dtype)

    def profile(self, on: bool = True) -> None:
        """Time the native step's parts (see stats())."""
        self.handle.profile = on

    def stats(self) -> dict:
        return self.handle.stats()

    def forward(self, tokens: torch.Tensor, cache, logits_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, T] after the cached positions -> logits [B, T, V] (or [B, R, V] at logits_index)."""
        from ..engine.kv_cache import PagedBatch
        from ..models.layers import KVCache

        if type(cache) is KVCache:
            return self._forward_static(tokens, cache, logits_index)
        if isinstance(cache, PagedBatch):
            return self._forward_paged(tokens, cache, logits_index)
        return self.model.forward(tokens, cache, logits_index)

    def _ptrs(self, holder, ks: list, vs: list):
        """(k pointer array, v pointer array, half) for a cache's per-layer tensors (all fp32 or all
        fp16), built once; None when the native step cannot use them."""
        got = getattr(holder, "_jisu_native_ptrs", None)
        if got is not None and got[0] == (ks[0].data_ptr(), len(ks)):
            return got[1]
        cfg = self.cfg
        if len(ks) != cfg.num_layers or len(vs) != cfg.num_layers:
            return None
        dtype = ks[0].dtype
        if dtype not in (_F32, torch.float16):
            return None
        for t in ks + vs:
            if (t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous() or t.dim() != 4
                    or t.shape != ks[0].shape or t.shape[1] != cfg.num_kv_heads or t.shape[3] != cfg.head_dim):
                return None
        kp = array("q", [t.data_ptr() for t in ks])
        vp = array("q", [t.data_ptr() for t in vs])
        ptrs = (kp, vp, dtype == torch.float16)
        holder._jisu_native_ptrs = ((ks[0].data_ptr(), len(ks)), ptrs)
        return ptrs

    def _rows(self, logits_index, T: int) -> list[int]:
        idx = [int(i) for i in (logits_index.reshape(-1).tolist() if isinstance(logits_index, torch.Tensor)
                                else logits_index)]
        for i in idx:
            if not -T <= i < T:
                raise IndexError(f"logits_index {i} is out of range for {T} tokens")
        return [i % T for i in idx]

    def _forward_static(self, tokens, cache, logits_index):
        B, T = tokens.shape
        start = cache.length
        if start + T > cache.max_len:
            raise ValueError(f"KV cache full: {start + T} > {cache.max_len} positions")
        ptrs = self._ptrs(cache, cache.k, cache.v)
        if ptrs is None or B == 0 or T == 0:
            return self.model.forward(tokens, cache, logits_index)
        tok = tokens if tokens.dtype == torch.int64 and tokens.is_contiguous() else tokens.to(torch.int64).contiguous()
        if logits_index is None:
            R = T
            rows = array("i", range(B * T))
        else:
            idx = self._rows(logits_index, T)
            R = len(idx)
            rows = array("i", [b * T + i for b in range(B) for i in idx])
        V = self.cfg.vocab_size
        out = torch.empty((B, R, V), dtype=_F32)
        qlens = array("i", [T] * B)
        starts = array("i", [start] * B)
        tables = array("i", range(B))
        self.handle.forward(tok.data_ptr(), B * T, B, qlens.buffer_info()[0], starts.buffer_info()[0],
                            tables.buffer_info()[0], 1, ptrs[0].buffer_info()[0], ptrs[1].buffer_info()[0],
                            cache.max_len, B, rows.buffer_info()[0], B * R, out.data_ptr(), ptrs[2])
        cache.advance(T)
        return out

    def _forward_paged(self, tokens, batch, logits_index):
        kv = batch.kv
        N = tokens.shape[-1]
        ptrs = self._ptrs(kv, kv.k, kv.v)
        if ptrs is None or tokens.shape[0] != 1 or N != sum(batch.q_lens) or N == 0:
            return self.model.forward(tokens, batch, logits_index)
        tok = tokens if tokens.dtype == torch.int64 and tokens.is_contiguous() else tokens.to(torch.int64).contiguous()
        S = len(batch.seqs)
        maxb = max(1, max(len(s.block_table) for s in batch.seqs))
        tables = array("i", [0]) * (S * maxb)
        for i, s in enumerate(batch.seqs):
            tables[i * maxb:i * maxb + len(s.block_table)] = array("i", s.block_table)
        rows = array("i", range(N) if logits_index is None else self._rows(logits_index, N))
        R = len(rows)
        out = torch.empty((1, R, self.cfg.vocab_size), dtype=_F32)
        qlens = array("i", batch.q_lens)
        starts = array("i", batch.starts)
        self.handle.forward(tok.data_ptr(), N, S, qlens.buffer_info()[0], starts.buffer_info()[0],
                            tables.buffer_info()[0], maxb, ptrs[0].buffer_info()[0], ptrs[1].buffer_info()[0],
                            kv.block_size, kv.pool.num_blocks, rows.buffer_info()[0], R, out.data_ptr(), ptrs[2])
        batch.advance(N)
        return out


def accelerate(model):
    """The native wrapper when jisu._kernels is built and `model` is a supported Llama-family model
    on the CPU; otherwise `model` unchanged (Gemma, CUDA, no native module)."""
    if isinstance(model, NativeLlama) or supported(model) is not None:
        return model
    return NativeLlama(model)
