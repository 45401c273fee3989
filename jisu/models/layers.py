"""Pieces every architecture shares: the per-sequence KV cache, rotary embeddings, attention."""
from __future__ import annotations

import math

import torch

from ..config import ModelConfig
from ..kernels import ops


def zeroed_tensors(n: int, shape: tuple, dtype=torch.float32) -> list[torch.Tensor]:
    """n zero-filled CPU tensors of `shape`, views of one anonymous memory mapping: its pages become
    resident only as positions are written (no fill to pay for), and all of them go back to the OS
    when the last view is freed (a cache taken from the heap instead leaves its freed pages there,
    and caches of other sizes fragment it: RSS then grows by several MB over a few generate calls)."""
    import mmap

    per = math.prod(shape)
    nbytes = max(1, n * per * torch.empty(0, dtype=dtype).element_size())
    if nbytes < (1 << 20):  # small caches: the heap is cheaper than a mapping
        return [torch.zeros(shape, dtype=dtype) for _ in range(n)]
    flat = torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype)  # the tensor keeps the mapping alive
    return [flat[i * per:(i + 1) * per].view(shape) for i in range(n)]


class KVCache:
    """Static per-layer K/V tensors for a batch of sequences that advance together.
    k[layer], v[layer]: [B, Hkv, max_len, D] (fp32, or fp16 to halve the bytes attention reads;
    values are rounded when stored and widened exactly when read); `length` positions are filled."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        if torch.device(device).type == "cpu":
            kv = zeroed_tensors(2 * cfg.num_layers, shape, dtype)
            self.k, self.v = kv[:cfg.num_layers], kv[cfg.num_layers:]
        else:
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.max_len = max_len
        self.length = 0

    def positions(self, num_new: int) -> torch.Tensor:
        """Absolute positions [T] of the next `num_new` tokens."""
        return torch.arange(self.length, self.length + num_new)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               softcap: float | None, window: int | None) -> torch.Tensor:
        """Store k/v [B, Hkv, T, D] after the filled positions and attend q [B, H, T, D] over
        everything cached -> [B, H, T, D]."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} > {self.max_len} positions")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        mask = ops.attention_mask(k.shape[2], start, window)
        kc, vc = self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        return ops.attention(q, kc.to(q.dtype), vc.to(q.dtype), mask, scale, softcap)

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, length: int) -> None:
        """Roll back to `length` positions (rejected speculative tokens, regenerated turns)."""
        self.length = min(self.length, length)


def embed_tokens(table, tokens: torch.Tensor) -> torch.Tensor:
    """Embedding rows for tokens [B, T] -> [B, T, hidden] fp32. The table is a float tensor or a
    packed kernel weight (a quantized GGUF embedding kept packed: only these rows are decoded)."""
    if isinstance(table, torch.Tensor):
        return table[tokens].float()
    return table.rows(tokens)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [D/2], with Llama 3 / linear scaling as in the models' configs."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv = torch.where(is_mid, mid, scaled)
    elif kind not in ("default", None):
        raise NotImplementedError(f"rope scaling {kind!r}")
    return inv


class Rotary:
    """cos/sin tables for positions, grown on demand. rotate-half ("neox") convention."""

    def __init__(self, head_dim: int, inv_freq: torch.Tensor):
        self.head_dim = head_dim
        self.inv_freq = inv_freq.float()
        self.cos = self.sin = torch.empty(0, head_dim)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        need = int(positions.max()) + 1
        if need > self.cos.shape[0]:
            size = max(need, 2 * self.cos.shape[0], 256)
            freqs = torch.arange(size, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
            emb = torch.cat([freqs, freqs], dim=-1)
            self.cos, self.sin = emb.cos(), emb.sin()
        return self.cos[positions], self.sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D], cos/sin: [T, D]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class CausalContext:
    """The attention context of a whole-sequence forward with no cache (calibration, tuning,
    evaluation of a text window): positions 0..T-1, causal attention over the block's own k/v.
    Any object with these three methods can be passed to a model's forward (the engine's runners
    pass one that writes K/V into the paged cache)."""

    def positions(self, num_new: int) -> torch.Tensor:
        """Absolute positions [T] of the `num_new` tokens."""
        return torch.arange(num_new)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               softcap: float | None, window: int | None) -> torch.Tensor:
        """q [B, H, T, D], k/v [B, Hkv, T, D] of the same T positions -> [B, H, T, D]."""
        mask = ops.attention_mask(q.shape[2], 0, window)
        return ops.attention(q, k, v, mask, scale, softcap)

    def advance(self, n: int) -> None:
        """Nothing is kept between calls: each forward is a whole sequence."""


def self_attention(h: torch.Tensor, w: dict, p: str, cfg: ModelConfig, layer: int, cache,
                   rope: tuple[torch.Tensor, torch.Tensor], scale: float, softcap: float | None = None,
                   window: int | None = None) -> torch.Tensor:
    """One attention block over h: [B, T, hidden] with weights named `p`+"self_attn.*" -> [B, T, hidden].
    `cache` stores the new K/V and runs the attention (KVCache, or a paged batch)."""
    b, t, _ = h.shape
    q = ops.linear(h, w[p + "self_attn.q_proj.weight"], w.get(p + "self_attn.q_proj.bias"))
    k = ops.linear(h, w[p + "self_attn.k_proj.weight"], w.get(p + "self_attn.k_proj.bias"))
    v = ops.linear(h, w[p + "self_attn.v_proj.weight"], w.get(p + "self_attn.v_proj.bias"))
    q = q.view(b, t, cfg.num_heads, cfg.head_dim).transpose(1, 2)      # [B, H, T, D]
    k = k.view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)   # [B, Hkv, T, D]
    v = v.view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
    if cfg.qk_norm:
        q = ops.rms_norm(q, w[p + "self_attn.q_norm.weight"], cfg.rms_norm_eps)
        k = ops.rms_norm(k, w[p + "self_attn.k_norm.weight"], cfg.rms_norm_eps)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = cache.attend(layer, q, k, v, scale, softcap, window)          # [B, H, T, D]
    out = out.transpose(1, 2).reshape(b, t, cfg.num_heads * cfg.head_dim)
    return ops.linear(out, w[p + "self_attn.o_proj.weight"])
