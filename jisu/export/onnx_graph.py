"""The ONNX graph of a Llama-family decoder with KV-cache inputs and outputs, built node by node:
dense weights (fp32, or fp16 cast on use) or llama.cpp-grid int8 / int4 weights through
onnxruntime's MatMulNBits (block 32, the grid's codes and scales exactly)."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import UnsupportedError
from ..models.layers import EMBED, HEAD, LINEARS, rope_inv_freq
from .quantize import GridWeight

OPSET = 17
ARCHS = ("llama", "mistral", "qwen2", "qwen3")
NBITS = {"Q4_0": 4, "Q8_0": 8}  # grid -> MatMulNBits bits (codes stored with the default zero point)


def check_graphable(cfg, where: str) -> None:
    if cfg.arch not in ARCHS:
        raise UnsupportedError(f"{where}: the ONNX export covers {', '.join(ARCHS)}, not {cfg.arch}")
    if cfg.attn_softcap or cfg.final_softcap:
        raise UnsupportedError(f"{where}: soft-capping is not in the ONNX export's graph")


def nbits_blob(gw: GridWeight) -> tuple[np.ndarray, np.ndarray, int]:
    """MatMulNBits' B [N, K/32, 32*bits/8] (uint8; codes with zero point 8 / 128) and scales [N, K/32]."""
    bits = NBITS[gw.qtype]
    n, k = gw.shape
    codes = gw.codes.to(torch.int32)
    if bits == 8:
        blob = (codes + 128).to(torch.uint8).numpy().reshape(n, k // 32, 32)
    else:  # Q4_0's codes are already 0..15 around 8; two per byte, the even one in the low nibble
        c = codes.to(torch.uint8).numpy().reshape(n, k // 32, 16, 2)
        blob = (c[..., 0] | (c[..., 1] << 4)).astype(np.uint8)
    return np.ascontiguousarray(blob), gw.grid.scale.numpy().astype(np.float32).reshape(n, k // 32), bits


class Graph:
    """Nodes, initializers and a name counter."""

    def __init__(self, fp16: bool):
        self.nodes, self.inits, self.count, self.fp16 = [], [], 0, fp16

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def init(self, name: str, a: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(a), name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        return self.init(self.name("c"), np.asarray(values, dtype=dtype))

    def op(self, op_type: str, inputs: list, n_out: int = 1, domain: str = "", **attrs):
        from onnx import helper

        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def dense(self, name: str, t: torch.Tensor) -> str:
        """A float initializer used as fp32 (stored fp16 and cast when the graph is fp16)."""
        a = t.detach().float().numpy()
        if not self.fp16:
            return self.init(name, a)
        return self.op("Cast", [self.init(name, a.astype(np.float16))], to=1)


class DecoderGraph:
    """Builds the decoder's graph over `weights` (HF names -> float tensor or GridWeight)."""

    def __init__(self, cfg, weights: dict, fp16: bool):
        self.cfg, self.w, self.g = cfg, weights, Graph(fp16)

    def linear(self, x: str, name: str, bias: str | None = None) -> str:
        g, w = self.g, self.w[name]
        if isinstance(w, GridWeight):
            blob, scales, bits = nbits_blob(w)
            n, k = w.shape
            ins = [x, g.init(name + ".qweight", blob), g.init(name + ".scales", scales)]
            y = g.op("MatMulNBits", ins, domain="com.microsoft", K=k, N=n, bits=bits, block_size=32)
        else:
            y = g.op("MatMul", [x, g.dense(name + ".T", w.detach().float().T.contiguous())])
        if bias is not None and bias in self.w:
            y = g.op("Add", [y, g.dense(bias, self.w[bias])])
        return y

    def rms_norm(self, x: str, name: str) -> str:
        g = self.g
        ms = g.op("ReduceMean", [g.op("Mul", [x, x])], axes=[-1], keepdims=1)
        eps = g.const([self.cfg.rms_norm_eps], np.float32)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, eps])])])
        return g.op("Mul", [g.op("Mul", [x, inv]), g.dense(name, self.w[name])])

    def rope(self, x: str, cos: str, sin: str) -> str:
        g, half = self.g, self.cfg.head_dim // 2
        x1, x2 = g.op("Split", [x, g.const([half, half])], n_out=2, axis=-1)
        rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])

    def masks(self, past_len: str, seq_len: str) -> dict:
        """Additive attention biases [B, 1, 1, S, T] per window (None: full causal)."""
        g = self.g
        total = g.op("Add", [past_len, seq_len])
        one, zero = g.const(1), g.const(0)
        kpos = g.op("Unsqueeze", [g.op("Range", [zero, total, one]), g.const([0])])        # [1, T]
        qpos = g.op("Unsqueeze", [g.op("Range", [past_len, total, one]), g.const([1])])    # [S, 1]
        pad = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=9), g.const([1, 2, 3])])  # [B,1,1,1,T]
        out = {}
        windows = {None} | ({self.cfg.sliding_window} if self.cfg.layer_types else set())
        for win in windows:
            allowed = g.op("LessOrEqual", [kpos, qpos])
            if win is not None:
                allowed = g.op("And", [allowed, g.op("Greater", [kpos, g.op("Sub", [qpos, g.const(win)])])])
            allowed = g.op("And", [pad, allowed])
            out[win] = g.op("Where", [allowed, g.const([0.0], np.float32), g.const([-1e30], np.float32)])
        return out

    def attention(self, i: int, h: str, cos: str, sin: str, masks: dict) -> tuple[str, str, str]:
        cfg, g = self.cfg, self.g
        heads, kv = cfg.heads(i)
        d = cfg.head_dim
        p = f"model.layers.{i}."

        def proj(short, n):
            y = self.linear(h, p + LINEARS[short] + ".weight", p + LINEARS[short] + ".bias")
            return g.op("Transpose", [g.op("Reshape", [y, g.const([0, 0, n, d])])], perm=[0, 2, 1, 3])

        q, k, v = proj("q", heads), proj("k", kv), proj("v", kv)
        if cfg.qk_norm:
            q, k = self.rms_norm(q, p + "self_attn.q_norm.weight"), self.rms_norm(k, p + "self_attn.k_norm.weight")
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        pk, pv = f"present.{i}.key", f"present.{i}.value"
        g.nodes.append(_node("Concat", [f"past_key_values.{i}.key", k], pk, axis=2))
        g.nodes.append(_node("Concat", [f"past_key_values.{i}.value", v], pv, axis=2))
        q5 = g.op("Reshape", [q, g.const([0, kv, heads // kv, -1, d])])                    # [B, KV, R, S, D]
        kt = g.op("Transpose", [g.op("Unsqueeze", [pk, g.const([2])])], perm=[0, 1, 2, 4, 3])  # [B, KV, 1, D, T]
        scores = g.op("Mul", [g.op("MatMul", [q5, kt]), g.const([d ** -0.5], np.float32)])
        win = cfg.sliding_window if cfg.is_sliding(i) else None
        probs = g.op("Softmax", [g.op("Add", [scores, masks[win]])], axis=-1)
        o = g.op("MatMul", [probs, g.op("Unsqueeze", [pv, g.const([2])])])                # [B, KV, R, S, D]
        o = g.op("Transpose", [g.op("Reshape", [o, g.const([0, heads, -1, d])])], perm=[0, 2, 1, 3])
        o = g.op("Reshape", [o, g.const([0, 0, heads * d])])
        return self.linear(o, p + LINEARS["o"] + ".weight", p + LINEARS["o"] + ".bias"), pk, pv

    def build(self, name: str = "jisu"):
        from onnx import TensorProto, helper

        cfg, g = self.cfg, self.g
        shape = g.op("Shape", ["input_ids"])
        seq_len = g.op("Gather", [shape, g.const(1)], axis=0)
        past_len = g.op("Gather", [g.op("Shape", ["past_key_values.0.key"]), g.const(2)], axis=0)
        masks = self.masks(past_len, seq_len)
        inv = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        if "rope_freqs" in self.w:
            inv = inv / self.w["rope_freqs"].float()
        pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], to=1), g.const([2])])      # [B, S, 1]
        freqs = g.op("Mul", [pos, g.init("rope.inv_freq", inv.float().numpy().reshape(1, 1, -1))])
        emb = g.op("Unsqueeze", [g.op("Concat", [freqs, freqs], axis=-1), g.const([1])])    # [B, 1, S, D]
        cos, sin = g.op("Cos", [emb]), g.op("Sin", [emb])
        table = self._table()
        x = g.op("Gather", [table, "input_ids"], axis=0)
        if g.fp16:
            x = g.op("Cast", [x], to=1)
        presents = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            a, pk, pv = self.attention(i, self.rms_norm(x, p + "input_layernorm.weight"), cos, sin, masks)
            x = g.op("Add", [x, a])
            h = self.rms_norm(x, p + "post_attention_layernorm.weight")
            gate = self.linear(h, p + LINEARS["gate"] + ".weight")
            up = self.linear(h, p + LINEARS["up"] + ".weight")
            act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
            x = g.op("Add", [x, self.linear(act, p + LINEARS["down"] + ".weight")])
            presents += [pk, pv]
        h = self.rms_norm(x, "model.norm.weight")
        g.nodes.append(self._head(h, table))
        f, i64 = TensorProto.FLOAT, TensorProto.INT64
        inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
                  helper.make_tensor_value_info("attention_mask", i64, ["batch", "total"]),
                  helper.make_tensor_value_info("position_ids", i64, ["batch", "seq"])]
        outputs = [helper.make_tensor_value_info("logits", f, ["batch", "seq", cfg.vocab_size])]
        for i in range(cfg.num_layers):
            kv = cfg.heads(i)[1]
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f,
                                                            ["batch", kv, "past", cfg.head_dim]))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f,
                                                             ["batch", kv, "total", cfg.head_dim]))
        graph = helper.make_graph(g.nodes, name, inputs, outputs, g.inits)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
        return helper.make_model(graph, opset_imports=opsets, producer_name="jisu")

    def _table(self) -> str:
        """The embedding table, as stored (fp16 in an fp16 graph: rows are cast after the Gather)."""
        a = self.w[EMBED].detach().float().numpy()
        return self.g.init(EMBED, a.astype(np.float16) if self.g.fp16 else a)

    def _head(self, h: str, table: str):
        g = self.g
        head = self.w.get(HEAD)
        if head is None or head is self.w[EMBED] or self.cfg.tie_embeddings:
            t = g.op("Cast", [table], to=1) if g.fp16 else table
            flat = g.op("Reshape", [h, g.const([-1, self.cfg.hidden_size])])
            y = g.op("Gemm", [flat, t], transB=1)
            out_shape = g.op("Concat", [g.op("Slice", [g.op("Shape", [h]), g.const([0]), g.const([2])]),
                                        g.const([self.cfg.vocab_size])], axis=0)
            return _node("Reshape", [y, out_shape], "logits")
        y = self.linear(h, HEAD)
        return _node("Identity", [y], "logits")


def _node(op_type: str, inputs: list, output: str, **attrs):
    from onnx import helper

    return helper.make_node(op_type, inputs, [output], **attrs)
