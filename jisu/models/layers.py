"""Pieces every architecture shares: rotary embeddings, the cache-free attention context, and the decoder
model cut into named pieces (embed, attention and MLP halves, head) that both forward and
compression run; the numerics (RMSNorm, linear, embedding rows) are a per-model strategy."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..config import ModelConfig
from ..kernels import ops


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


EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
# short name -> HF name inside "model.layers.{i}." of every linear of a decoder layer
LINEARS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def linear_name(i: int, short: str) -> str:
    return f"model.layers.{i}.{LINEARS[short]}.weight"


def linear_names(cfg: ModelConfig) -> list[str]:
    return [linear_name(i, s) for i in range(cfg.num_layers) for s in LINEARS]


class Numerics:
    """How a model computes its RMSNorms, linears and embedding rows. This one is inference's: the
    native kernels (jisu.kernels.ops). Compression swaps in its float32 reference numerics
    (jisu.compress.observe) on its own model instances."""

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        return ops.rms_norm(x, w, eps)

    def linear(self, x: torch.Tensor, weight, bias: Optional[torch.Tensor], name: str) -> torch.Tensor:
        """x [..., K] @ weight [N, K]^T (+ bias); `name` is the weight's HF name."""
        return ops.linear(x, weight, bias)

    def embed(self, table, tokens: torch.Tensor, name: str) -> torch.Tensor:
        return embed_tokens(table, tokens)


INFERENCE = Numerics()


class DecoderModel:
    """A pre-norm decoder over weights `w` (HF names; fp32 tensors or packed kernel weights), cut
    into the pieces compression runs one at a time. forward() is their composition:

        x = embed(tokens); for each layer i: x = layer(i, x, ctx); logits = head(final_hidden(x))
        layer = attn_out(attn_core(attn_in(x))) then mlp_out(mlp_core(mlp_in(x)))

    `observer`, when set, is called with (weight name, input) before every linear (calibration
    statistics: GPTQ's Hessians, AWQ's scales). A family subclass sets the class attributes below,
    `act` (the MLP's activation of the gate) and `_attention_setup`."""

    # groups of linears that read the same input, in the order a layer runs them
    # (the groups of more than one read one input: the native step fuses them into one matrix)
    LINEAR_GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
    MLP_NORM = "post_attention_layernorm"        # the norm before the MLP
    ATTN_POST_NORM: Optional[str] = None         # a norm of the attention block's output (Gemma)
    MLP_POST_NORM: Optional[str] = None          # a norm of the MLP's output (Gemma)
    # what absorbs 1/s when a group's input channels are scaled by s (AWQ): a layer norm (key in
    # `names`) or the rows of the linear that produces the group's input
    SCALE_ABSORBERS = {("q", "k", "v"): ("norm", "attn_norm"), ("o",): ("rows", "v"),
                       ("gate", "up"): ("norm", "mlp_norm"), ("down",): ("rows", "up")}

    @classmethod
    def over(cls, cfg: ModelConfig, w: dict, numerics: Numerics = INFERENCE) -> "DecoderModel":
        """A model computing over `w` as given (already in the form the model computes with) and
        not copied: compression edits it in place as it quantizes."""
        model = cls.__new__(cls)
        model.w = w
        model._build(cfg, numerics)
        return model

    @classmethod
    def fused_groups(cls) -> list[tuple[str, ...]]:
        """The LINEAR_GROUPS of more than one linear, as HF names inside a layer
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))."""
        return [tuple(LINEARS[s] for s in g) for g in cls.LINEAR_GROUPS if len(g) > 1]

    def _build(self, cfg: ModelConfig, numerics: Numerics) -> None:
        self.cfg = cfg
        self.numerics = numerics
        self.observer: Optional[Callable[[str, torch.Tensor], None]] = None
        if cfg.tie_embeddings or HEAD not in self.w:
            self.w[HEAD] = self.w[EMBED]
        self.names = [self._layer_names(i) for i in range(cfg.num_layers)]
        self._attention_setup(cfg)   # rotaries, layer_kinds, windows, scale, attn_softcap

    def _layer_names(self, i: int) -> dict:
        p = f"model.layers.{i}."
        names = {s: (p + n + ".weight", p + n + ".bias") for s, n in LINEARS.items()}
        names.update({k: (p + n + ".weight" if n else None) for k, n in (
            ("attn_norm", "input_layernorm"), ("mlp_norm", self.MLP_NORM), ("attn_post", self.ATTN_POST_NORM),
            ("mlp_post", self.MLP_POST_NORM), ("q_norm", "self_attn.q_norm"), ("k_norm", "self_attn.k_norm"))})
        return names

    # --- the numerics, through the per-model strategy -------------------------------------------
    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.numerics.rms_norm(x, self.w[name], self.cfg.rms_norm_eps)

    def linear(self, x: torch.Tensor, name: str, bias: Optional[str] = None) -> torch.Tensor:
        if self.observer is not None:
            self.observer(name, x)
        return self.numerics.linear(x, self.w[name], self.w.get(bias) if bias else None, name)

    # --- pieces ---------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> hidden states [B, T, hidden] fp32."""
        return self.numerics.embed(self.w[EMBED], tokens, EMBED)

    def rope_tables(self, positions: torch.Tensor) -> dict:
        """Layer kind -> (cos, sin) [T, D] at `positions`."""
        return {kind: rotary.tables(positions) for kind, rotary in self.rotaries.items()}

    def attn_in(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The normed input of q/k/v."""
        return self.norm(x, self.names[i]["attn_norm"])

    def attn_core(self, i: int, h: torch.Tensor, ctx, rope: Optional[dict] = None) -> torch.Tensor:
        """q/k/v projections, q/k norms, RoPE and attention through `ctx` -> the input of o_proj
        [B, T, H*D]. `rope`: rope_tables at the context's positions (computed when None)."""
        cfg, n = self.cfg, self.names[i]
        b, t, _ = h.shape
        kind = self.layer_kinds[i]
        cos, sin = (rope if rope is not None else self.rope_tables(ctx.positions(t)))[kind]
        heads, kv_heads = cfg.heads(i)  # a pruned layer may have fewer
        q = self.linear(h, *n["q"]).view(b, t, heads, cfg.head_dim).transpose(1, 2)      # [B, H, T, D]
        k = self.linear(h, *n["k"]).view(b, t, kv_heads, cfg.head_dim).transpose(1, 2)   # [B, Hkv, T, D]
        v = self.linear(h, *n["v"]).view(b, t, kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.norm(q, n["q_norm"]), self.norm(k, n["k_norm"])
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = ctx.attend(i, q, k, v, self.scale, self.attn_softcap, self.windows[kind])          # [B, H, T, D]
        return out.transpose(1, 2).reshape(b, t, heads * cfg.head_dim)

    def attn_out(self, i: int, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """o_proj of the attention output `a`, added to the residual x."""
        n = self.names[i]
        h = self.linear(a, *n["o"])
        return x + (self.norm(h, n["attn_post"]) if n["attn_post"] else h)

    def mlp_in(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The normed input of gate/up."""
        return self.norm(x, self.names[i]["mlp_norm"])

    def mlp_core(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """gate/up projections and the activation -> the input of down_proj."""
        n = self.names[i]
        return self.act(self.linear(h, *n["gate"])) * self.linear(h, *n["up"])

    def mlp_out(self, i: int, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """down_proj of `d`, added to the residual x."""
        n = self.names[i]
        h = self.linear(d, *n["down"])
        return x + (self.norm(h, n["mlp_post"]) if n["mlp_post"] else h)

    def layer(self, i: int, x: torch.Tensor, ctx, rope: Optional[dict] = None) -> torch.Tensor:
        """Decoder layer i over hidden states x [B, T, hidden]."""
        x = self.attn_out(i, x, self.attn_core(i, self.attn_in(i, x), ctx, rope))
        return self.mlp_out(i, x, self.mlp_core(i, self.mlp_in(i, x)))

    def final_hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x, "model.norm.weight")

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """LM head logits [..., V] of final hidden states."""
        return self.cap_logits(self.linear(h, HEAD))

    def cap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the model does to the head's output (Gemma: final soft-capping)."""
        return logits

    def forward(self, tokens: torch.Tensor, ctx, logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: [B, T] appended after the context's positions (CausalContext, or the torch runner's
        PagedAttention over the paged cache) -> logits [B, T, V] fp32, or only at positions `logits_index` [R] -> [B, R, V]."""
        seq = tokens.shape[1]
        rope = self.rope_tables(ctx.positions(seq))
        x = self.embed(tokens)
        for i in range(self.cfg.num_layers):
            x = self.layer(i, x, ctx, rope)
        ctx.advance(seq)
        if logits_index is not None:
            x = x[:, logits_index]
        return self.head(self.final_hidden(x))
