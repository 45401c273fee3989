"""The one interface models call for compute-heavy ops: linear, rms_norm, rope,
attention_decode. CPU float32 inputs go to the native module (jisu._kernels) through raw
pointers; everything else (CUDA, other dtypes, module not built) uses the PyTorch
reference code below, with a one-time warning when that happens on CPU.

Inference only: the native paths do not record autograd.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from . import _native
from .packed import PackedWeight, pack  # noqa: F401  (re-exported)

_K = _native.K
_F32 = torch.float32

# Dense float32 weights go to the native kernel up to this many rows of x (it is faster
# than torch there, and its per-row result does not depend on M); above, torch's GEMM.
F32_NATIVE_MAX_M = 64


# ----------------------------------------------------------------------------- control
def native_available() -> bool:
    return _K is not None


def set_num_threads(n: int) -> None:
    """Threads the native kernels use (<= 0: all CPUs this process may run on)."""
    if _K is not None:
        _K.set_num_threads(int(n))


def get_num_threads() -> int:
    return _K.get_num_threads() if _K is not None else 1


def set_act_refine(threshold: float) -> None:
    """Outlier-block refinement of the int8 activations the packed kernels multiply: a block of 32
    values whose absolute maximum exceeds `threshold` x the mean block maximum of its row (an
    outlier channel, which would round the rest of its block to a few levels) also carries its
    rounding residual, at 1/256 of the block's step instead of 1/2. 0 turns it off (plain
    per-block int8, as llama.cpp's Q8_0 activations)."""
    if _K is not None:
        _K.set_act_refine(float(threshold))


# set_act_refine(PRECISE) refines every block: ~15-bit activations (x ~ d (q + q2/128)), at the cost
# of a second integer pass over each block (on a Zen 4 core: prefill ~0.55x, decode ~0.93x).
PRECISE = 1e-6


def get_act_refine() -> float:
    return float(_K.get_act_refine()) if _K is not None else 0.0


def set_head_rescore(on: bool) -> None:
    """The native step's LM head under dense refinement (faithful steps): plain int8 blocks for every
    vocabulary row, then refined only the rows whose refined logit could be the largest (bounded by
    each row's norm times the activation residual's norm), so the greedy token is the refined head's
    at about the plain head's cost; the other rows keep their plain values. Off (the default) and
    under `--precise`: the refined head itself (bit for bit the reference path's logits)."""
    if _K is not None:
        _K.set_head_rescore(bool(on))


def get_head_rescore() -> bool:
    return bool(_K.get_head_rescore()) if _K is not None else False


def head_row_norms(weight) -> torch.Tensor:
    """Upper bounds of the decoded rows' Euclidean norms of a packed weight (the head's rescoring)."""
    out = torch.empty(weight.shape[0], dtype=torch.float32)
    _K.head_row_norms(weight._addr, out.data_ptr())
    return out


def linear_head(x: torch.Tensor, weight, norms: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The native step's LM head on x [M, K] (see set_head_rescore): (logits [M, N], whether the rows
    were rescored)."""
    x = x.to(torch.float32).contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    done = _K.linear_head(weight._addr, x.data_ptr(), out.data_ptr(), x.shape[0], norms.data_ptr())
    return out, bool(done)


def is_precise() -> bool:
    """Whether every activation block is refined (set_act_refine(PRECISE), `--precise`)."""
    return 0.0 < get_act_refine() <= 10 * PRECISE


def cpu_features() -> dict:
    return _K.cpu_features() if _K is not None else {}


def set_isa(name: str) -> None:
    """Forces a kernel ISA: 'scalar', 'avx2', 'avx512', 'neon' or 'best'."""
    if _K is not None:
        _K.set_isa(name)


def get_isa() -> str:
    return _K.get_isa() if _K is not None else "torch"


# Paths this project's CI machine cannot run: checked once per process before first use.
_UNTESTED_ISAS = ("avx512", "neon")


def _verify_isas() -> list:
    """Runs each SIMD path once on small problems against the scalar path and drops any that
    disagree (e.g. AVX-512 code on a CPU this project's CI cannot test). Returns the ISAs kept."""
    if _K is None:
        return []
    isas = _K.available_isas()
    if not any(n in _UNTESTED_ISAS for n in isas):
        return isas
    from .formats import CodebookWeight, Int3Weight, Int4Weight, Int8Weight

    g = torch.Generator().manual_seed(0)
    w = torch.randn(19, 128, generator=g)
    x = torch.randn(5, 128, generator=g)
    weights = [pack(Int4Weight.quantize_rtn(w, 32)), pack(Int4Weight.quantize_rtn(w, 64, sym=False)),
               pack(Int8Weight.quantize_rtn(w, 32)), pack(Int8Weight.quantize_rtn(w)),
               pack(Int3Weight.quantize_rtn(w, 32)), pack(CodebookWeight.quantize_rtn(w, 32))]
    old = _K.get_isa()

    xo = x.clone()
    xo[:, ::37] *= 30.0  # outlier channels: blocks the refinement picks

    def run():
        refine = _K.get_act_refine()
        outs = [p.linear(x[:m]) for p in weights for m in (1, 5)]
        try:  # refined activation blocks (set_act_refine) through every INT kernel
            _K.set_act_refine(1.5)
            outs += [p.linear(xo[:m]) for p in weights for m in (1, 5)]
        finally:
            _K.set_act_refine(refine)
        f32 = [pack(w).linear(x[:m]) for m in (1, 5)]
        return outs, f32

    _K.set_isa("scalar")
    ref, ref32 = run()
    kept = []
    for name in isas:
        if name not in _UNTESTED_ISAS:
            kept.append(name)
            continue
        _K.set_isa(name)
        outs, f32 = run()
        ok = all(torch.equal(a, b) for a, b in zip(outs, ref)) and all(
            (a - b).abs().max() <= 1e-4 * b.abs().max() for a, b in zip(f32, ref32))
        if ok:
            kept.append(name)
        else:
            import warnings
            warnings.warn(f"jisu.kernels: the {name} kernels disagree with the scalar reference on this "
                          "CPU; not using them (please report this)", RuntimeWarning)
    _K.set_isa(old if old in kept else kept[0])
    return kept


VERIFIED_ISAS = _verify_isas()


def force_isa(name: str, what: str = "isa") -> None:
    """Run the kernels on ISA `name` (scalar, avx2, avx512, neon, or best) for the whole process, e.g.
    to measure the AVX2 path on an AVX-512 machine; a name this CPU cannot run is a one-line error."""
    name = name.strip().lower()
    if _K is None:
        return
    if VERIFIED_ISAS and name not in VERIFIED_ISAS and name != "best":
        from ..errors import UnsupportedError

        raise UnsupportedError(f"{what}={name!r}: this CPU's kernels are {', '.join(VERIFIED_ISAS)} (or 'best')")
    set_isa(name)


# The one process-level switch read from the environment (besides JISU_NO_NATIVE in _native.py):
# JISU_ISA applies to every process a benchmark or test starts, before any kernel runs.
if os.environ.get("JISU_ISA", "").strip():
    force_isa(os.environ["JISU_ISA"], "JISU_ISA")


# ----------------------------------------------------------------------------- linear
def linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ W.T + bias for x [..., K]; weight is a float tensor [N, K] or a PackedWeight."""
    if type(weight) is not torch.Tensor:
        if isinstance(weight, PackedWeight):
            return weight.linear(x, bias)
        weight = torch.as_tensor(weight)
    if (_K is not None and x.is_cpu and x.dtype is _F32 and weight.dtype is _F32 and weight.is_cpu
            and x.numel() <= F32_NATIVE_MAX_M * x.shape[-1] and weight.is_contiguous()):
        if not x.is_contiguous():
            x = x.contiguous()
        N, K = weight.shape
        shp = list(x.shape)
        if shp[-1] != K:
            raise ValueError(f"linear: x has {shp[-1]} features, weight expects {K}")
        shp[-1] = N
        out = x.new(*shp)
        b = 0
        if bias is not None:
            if bias.dtype is not _F32 or not bias.is_contiguous():
                bias = bias.to(torch.float32).contiguous()
            b = bias.data_ptr()
        _K.linear_f32(weight.data_ptr(), N, K, x.data_ptr(), out.data_ptr(), x.numel() // K, b)
        return out
    return F.linear(x, weight, bias)


# ----------------------------------------------------------------------------- rms_norm
def rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Llama RMSNorm in float32: w * (x * rsqrt(mean(x^2) + eps))."""
    xf = x.to(torch.float32)
    var = xf.pow(2).mean(-1, keepdim=True)
    return (w.to(torch.float32) * (xf * torch.rsqrt(var + eps))).to(x.dtype)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    if _K is not None and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32:
        if not x.is_contiguous():
            x = x.contiguous()
        if not w.is_contiguous():
            w = w.contiguous()
        D = x.shape[-1]
        out = torch.empty_like(x)
        _K.rms_norm(x.data_ptr(), w.data_ptr(), out.data_ptr(), x.numel() // D, D, float(eps))
        return out
    if x.device.type == "cpu":
        _native.warn_fallback()
    return rms_norm_ref(x, w, eps)


# ----------------------------------------------------------------------------- rope
def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (neox / HF Llama) RoPE. x [T, H, D]; cos, sin [T, D/2] (or HF's [T, D])."""
    D = x.shape[-1]
    c = cos[..., : D // 2].to(x.dtype)[:, None, :]
    s = sin[..., : D // 2].to(x.dtype)[:, None, :]
    c = torch.cat([c, c], -1)
    s = torch.cat([s, s], -1)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    rot = torch.cat([-x2, x1], -1)
    return x * c + rot * s


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Applies RoPE to x [T, H, D] with cos/sin [T, D/2] (or [T, D] with duplicated halves).
    `out=x` rotates in place."""
    T, H, D = x.shape
    if (_K is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and cos.dtype == torch.float32 and sin.dtype == torch.float32 and D % 2 == 0):
        if not x.is_contiguous():
            x = x.contiguous()
        if cos.shape[-1] != D // 2:
            cos = cos[..., : D // 2]
            sin = sin[..., : D // 2]
        cos = cos.reshape(T, D // 2)
        sin = sin.reshape(T, D // 2)
        if not cos.is_contiguous():
            cos = cos.contiguous()
        if not sin.is_contiguous():
            sin = sin.contiguous()
        if out is None:
            out = torch.empty_like(x)
        elif not out.is_contiguous() or out.shape != x.shape or out.dtype != torch.float32:
            raise ValueError("rope: out must be a contiguous float32 tensor shaped like x")
        _K.rope(x.data_ptr(), out.data_ptr(), cos.data_ptr(), sin.data_ptr(), T, H, D)
        return out
    if x.device.type == "cpu":
        _native.warn_fallback()
    r = rope_ref(x, cos.reshape(T, -1), sin.reshape(T, -1))
    if out is not None:
        out.copy_(r)
        return out
    return r


# ----------------------------------------------------------------------------- attention
def attention_decode_ref(q, k_cache, v_cache, length: int, scale: Optional[float] = None):
    """One new token: q [H, D], caches [Hkv, Tcap, D] (first `length` rows valid) -> [H, D]."""
    H, D = q.shape
    Hkv = k_cache.shape[0]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k_cache[:, :length].to(torch.float32).repeat_interleave(H // Hkv, 0)
    v = v_cache[:, :length].to(torch.float32).repeat_interleave(H // Hkv, 0)
    s = torch.einsum("hd,htd->ht", q.to(torch.float32), k) * scale
    p = torch.softmax(s, dim=-1)
    return torch.einsum("ht,htd->hd", p, v).to(q.dtype)


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     length: Optional[int] = None, scale: Optional[float] = None) -> torch.Tensor:
    """Attention of ONE new token over a KV cache with grouped KV heads (GQA).

    q [H, D]; k_cache, v_cache [Hkv, Tcap, D] with the first `length` positions valid
    (default: all Tcap); H must be a multiple of Hkv. Softmax in float32. Returns [H, D]."""
    H, D = q.shape
    Hkv, Tcap, Dk = k_cache.shape
    length = Tcap if length is None else int(length)
    if Dk != D or v_cache.shape != k_cache.shape or H % Hkv or not 0 < length <= Tcap:
        raise ValueError(f"attention_decode: bad shapes q {tuple(q.shape)} k {tuple(k_cache.shape)} "
                         f"v {tuple(v_cache.shape)} length {length}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if (_K is not None and q.device.type == "cpu" and q.dtype == torch.float32
            and k_cache.dtype == torch.float32 and v_cache.dtype == torch.float32
            and k_cache.is_contiguous() and v_cache.is_contiguous()):
        if not q.is_contiguous():
            q = q.contiguous()
        out = torch.empty_like(q)
        _K.attn_decode(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
                       H, Hkv, D, length, Tcap, scale)
        return out
    if q.device.type == "cpu":
        _native.warn_fallback()
    return attention_decode_ref(q, k_cache, v_cache, length, scale)


# ----------------------------------------------------------------------------- attention (reference)
def attention_mask(q_len: int, start: int, window: int | None) -> torch.Tensor | None:
    """Boolean mask [q_len, start + q_len] (True = attend): causal, optionally a sliding window."""
    if q_len == 1 and (window is None or start < window):
        return None
    k_len = start + q_len
    qpos = torch.arange(start, k_len)[:, None]
    kpos = torch.arange(k_len)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return mask


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float, softcap: float | None = None) -> torch.Tensor:
    """q: [B, H, T, D], k/v: [B, Hkv, S, D] -> [B, H, T, D]. Grouped KV heads are shared."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)
