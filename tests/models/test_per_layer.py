"""Layers of different widths (what structured pruning leaves): a layer with fewer attention heads
and a narrower MLP computes what the full model computes with those heads' and channels'
contributions zeroed."""
from __future__ import annotations

import torch

from jisu.config import ModelConfig
from jisu.models.layers import CausalContext
from jisu.models.llama import LlamaModel
from tests.fixtures import TINY, tiny_weights

D = TINY["hidden_size"] // TINY["num_attention_heads"]


def config(**kw) -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=TINY["vocab_size"], hidden_size=TINY["hidden_size"],
                       intermediate_size=TINY["intermediate_size"], num_layers=TINY["num_hidden_layers"],
                       num_heads=TINY["num_attention_heads"], num_kv_heads=TINY["num_key_value_heads"],
                       head_dim=D, rms_norm_eps=1e-5, **kw)


def test_pruned_heads_and_channels_equal_zeroed_ones():
    full = tiny_weights(0)
    p = "model.layers.1."
    # layer 1 keeps query heads 0-1 and KV head 0 (one GQA group) and MLP channels 0-39 of 64
    keep_q, keep_kv, keep_f = slice(0, 2 * D), slice(0, D), slice(0, 40)
    zeroed = dict(full)
    zeroed[p + "self_attn.o_proj.weight"] = full[p + "self_attn.o_proj.weight"].clone()
    zeroed[p + "self_attn.o_proj.weight"][:, 2 * D:] = 0
    zeroed[p + "mlp.down_proj.weight"] = full[p + "mlp.down_proj.weight"].clone()
    zeroed[p + "mlp.down_proj.weight"][:, 40:] = 0
    pruned = dict(full)
    pruned[p + "self_attn.q_proj.weight"] = full[p + "self_attn.q_proj.weight"][keep_q].clone()
    pruned[p + "self_attn.k_proj.weight"] = full[p + "self_attn.k_proj.weight"][keep_kv].clone()
    pruned[p + "self_attn.v_proj.weight"] = full[p + "self_attn.v_proj.weight"][keep_kv].clone()
    pruned[p + "self_attn.o_proj.weight"] = full[p + "self_attn.o_proj.weight"][:, keep_q].clone()
    for n in ("gate", "up"):
        pruned[p + f"mlp.{n}_proj.weight"] = full[p + f"mlp.{n}_proj.weight"][keep_f].clone()
    pruned[p + "mlp.down_proj.weight"] = full[p + "mlp.down_proj.weight"][:, keep_f].clone()

    tokens = torch.randint(0, TINY["vocab_size"], (1, 11), generator=torch.Generator().manual_seed(3))
    a = LlamaModel(config(), zeroed).forward(tokens, CausalContext())
    cfg = config(layer_heads=((4, 2), (2, 1)), intermediate_sizes=(64, 40))
    b = LlamaModel(cfg, pruned).forward(tokens, CausalContext())
    assert cfg.heads(1) == (2, 1) and cfg.mlp_width(1) == 40
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
