"""A layer-at-a-time forward pass for compression (pure PyTorch, differentiable).

It mirrors jisu.models.llama / jisu.models.gemma (the tests check that the logits agree) but is
cut into the pieces a quantizer needs: the input of every linear can be observed ("taps"), a
layer can run on its own from stored hidden states, and autograd works (for Fisher weights).
Weights are held in a dict by HF name in "model form" (Gemma norms with the +1 folded in); each
value is a float tensor or a packed kernel weight.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..kernels.ops import rms_norm_ref
from ..kernels.ops import attention, attention_mask
from ..models import model_form, source_form  # noqa: F401  (Gemma's norm offset, for compress/)
from ..models.layers import Rotary, apply_rope, rope_inv_freq

# short name -> HF name suffix inside "model.layers.{i}."
LINEARS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def linear_name(i: int, short: str) -> str:
    return f"model.layers.{i}.{LINEARS[short]}.weight"


def linear_names(cfg: ModelConfig) -> list[str]:
    return [linear_name(i, s) for i in range(cfg.num_layers) for s in LINEARS]


Tap = Callable[[torch.Tensor], None]


def as_float(t) -> torch.Tensor:
    """A float tensor, or the exact float32 weights of a packed kernel weight."""
    return t if isinstance(t, torch.Tensor) else t.dequantize()


class _DequantLinear(torch.autograd.Function):
    """x @ W^T for a packed weight in float32, differentiable in x; the backward pass decodes W
    again instead of keeping it, so a Fisher pass holds no float copy of the model."""

    @staticmethod
    def forward(ctx, x, packed):
        ctx.packed = packed
        blocks = _row_blocks(packed)
        if blocks is None:
            return F.linear(x, packed.dequantize())
        out = x.new_empty(*x.shape[:-1], packed.N)
        for r0, r1, w in blocks:
            out[..., r0:r1] = F.linear(x, w)
        return out

    @staticmethod
    def backward(ctx, g):
        blocks = _row_blocks(ctx.packed)
        if blocks is None:
            return g @ ctx.packed.dequantize(), None
        gx = None
        for r0, r1, w in blocks:
            part = g[..., r0:r1] @ w
            gx = part if gx is None else gx.add_(part)
        return gx, None


BLOCK_ELEMS = 1 << 22  # a packed matrix larger than this (an LM head) is decoded a block of rows at a time


def _row_blocks(packed):
    """(r0, r1, float32 rows) over a large packed int matrix, or None (decode it whole)."""
    from ..kernels.packed import NR, PackedInt

    if not isinstance(packed, PackedInt) or packed.N * packed.K <= BLOCK_ELEMS:
        return None
    T = (packed.N + NR - 1) // NR
    step = max(1, BLOCK_ELEMS // packed.K // NR)
    return ((t0 * NR, min((t0 + step) * NR, packed.N), packed._dequant_tiles(t0, min(T, t0 + step)))
            for t0 in range(0, T, step))


class Runner:
    """Runs a Llama- or Gemma-family model piece by piece over weights `w` (model form).

    Weights may be packed kernel weights: with exact=True they are decoded to float32 when used
    (the full-precision reference, calibration of the source), otherwise they run through the
    native kernels as a loaded artifact does (layers already quantized)."""

    def __init__(self, cfg: ModelConfig, w: dict, exact: bool = False):
        self.cfg, self.w, self.exact = cfg, w, exact
        self.gemma = cfg.family == "gemma"
        self.hooks: Optional[Callable[[str, torch.Tensor], None]] = None  # (weight name, output) for Fisher
        if self.gemma:
            self.rotary_full = Rotary(cfg.head_dim, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
            local = cfg.rope_local_theta or cfg.rope_theta
            self.rotary_local = Rotary(cfg.head_dim, rope_inv_freq(cfg.head_dim, local,
                                                                    None if cfg.rope_local_theta else cfg.rope_scaling))
            self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        else:
            inv = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
            if "rope_freqs" in w:
                inv = inv / w["rope_freqs"].float()
            self.rotary = Rotary(cfg.head_dim, inv)
            self.scale = cfg.head_dim ** -0.5
        self._ctx = {}

    # --- helpers ---------------------------------------------------------------------------
    def _context(self, i: int, seq: int):
        kind = "sliding" if self.cfg.is_sliding(i) else "full"
        key = (kind, seq)
        if key not in self._ctx:
            pos = torch.arange(seq)
            if self.gemma:
                rot = self.rotary_local if kind == "sliding" else self.rotary_full
                mask = attention_mask(seq, 0, self.cfg.sliding_window if kind == "sliding" else None)
            else:
                rot = self.rotary
                mask = attention_mask(seq, 0, self.cfg.sliding_window if self.cfg.layer_types else None)
            self._ctx[key] = (*rot.tables(pos), mask)
        return self._ctx[key]

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return rms_norm_ref(x, self.w[name], self.cfg.rms_norm_eps)

    def lin(self, x: torch.Tensor, name: str, taps: Optional[dict] = None, short: str = "") -> torch.Tensor:
        if taps and short in taps:
            taps[short](x)
        wt = self.w[name]
        bias = self.w.get(name[:-len("weight")] + "bias")
        if isinstance(wt, torch.Tensor):
            y = F.linear(x, wt, bias)
        elif self.exact:
            y = _DequantLinear.apply(x, wt)
            if bias is not None:
                y = y + bias
        else:
            y = wt.linear(x.contiguous(), bias)
        if self.hooks is not None and y.requires_grad:
            self.hooks(name, y)
        return y

    # --- pieces ------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        table = self.w[EMBED]
        if isinstance(table, torch.Tensor):
            x = table[tokens].float()
        else:  # packed (a GGUF's Q8_0 embedding): decode only these rows
            try:
                from ..models.layers import embed_tokens
            except ImportError:  # pragma: no cover
                x = table.dequantize()[tokens]
            else:
                x = embed_tokens(table, tokens)
        if self.gemma:
            x = x * torch.tensor(self.cfg.embed_scale, dtype=torch.float32)
        return x

    def attn_in(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Normed input of q/k/v."""
        return self.norm(x, f"model.layers.{i}.input_layernorm.weight")

    def attn_core(self, i: int, h: torch.Tensor, taps: Optional[dict] = None) -> torch.Tensor:
        """q/k/v projections, RoPE, attention -> the input of o_proj [B, T, H*D]."""
        cfg, p = self.cfg, f"model.layers.{i}."
        b, t, _ = h.shape
        cos, sin, mask = self._context(i, t)
        q = self.lin(h, p + "self_attn.q_proj.weight", taps, "q").view(b, t, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = self.lin(h, p + "self_attn.k_proj.weight", taps, "k").view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.lin(h, p + "self_attn.v_proj.weight", taps, "v").view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm:
            q = rms_norm_ref(q, self.w[p + "self_attn.q_norm.weight"], cfg.rms_norm_eps)
            k = rms_norm_ref(k, self.w[p + "self_attn.k_norm.weight"], cfg.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, k, v, mask, self.scale, cfg.attn_softcap if self.gemma else None)
        return out.transpose(1, 2).reshape(b, t, cfg.num_heads * cfg.head_dim)

    def attn_out(self, i: int, x: torch.Tensor, a: torch.Tensor, taps: Optional[dict] = None) -> torch.Tensor:
        p = f"model.layers.{i}."
        h = self.lin(a, p + "self_attn.o_proj.weight", taps, "o")
        if self.gemma:
            h = self.norm(h, p + "post_attention_layernorm.weight")
        return x + h

    def mlp_in(self, i: int, x: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{i}."
        return self.norm(x, p + ("pre_feedforward_layernorm.weight" if self.gemma else "post_attention_layernorm.weight"))

    def mlp_core(self, i: int, h: torch.Tensor, taps: Optional[dict] = None) -> torch.Tensor:
        """gate/up projections and the activation -> the input of down_proj."""
        p = f"model.layers.{i}."
        gate = self.lin(h, p + "mlp.gate_proj.weight", taps, "gate")
        up = self.lin(h, p + "mlp.up_proj.weight", taps, "up")
        act = F.gelu(gate, approximate="tanh") if self.gemma else F.silu(gate)
        return act * up

    def mlp_out(self, i: int, x: torch.Tensor, d: torch.Tensor, taps: Optional[dict] = None) -> torch.Tensor:
        p = f"model.layers.{i}."
        h = self.lin(d, p + "mlp.down_proj.weight", taps, "down")
        if self.gemma:
            h = self.norm(h, p + "post_feedforward_layernorm.weight")
        return x + h

    def layer(self, i: int, x: torch.Tensor, taps: Optional[dict] = None) -> torch.Tensor:
        x = self.attn_out(i, x, self.attn_core(i, self.attn_in(i, x), taps), taps)
        return self.mlp_out(i, x, self.mlp_core(i, self.mlp_in(i, x), taps), taps)

    def final_hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x, "model.norm.weight")

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """LM head logits."""
        return self.head_post(self.lin(h, HEAD if HEAD in self.w else EMBED))

    def head_post(self, logits: torch.Tensor) -> torch.Tensor:
        """What the model does to the head's output (Gemma's final soft-capping)."""
        if self.gemma and self.cfg.final_softcap:
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for i in range(self.cfg.num_layers):
            x = self.layer(i, x)
        return self.head(self.final_hidden(x))
