"""The native step on a model whose layers differ in MLP width and head counts (what structured
pruning leaves): against the reference model through the paged cache (each layer's KV heads its
own), fp32 and packed, the reference's own paged path, and bad per-layer sizes refused."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from jisu.engine.kv_cache import PagedKVCache, SeqBlocks
from jisu.engine.native_runner import NativeRunner, supported
from jisu.engine.runner import TorchRunner, make_runner
from jisu.models import build_model
from tests.fixtures import TINY, tiny_weights
from tests.kernels.helpers import FORMATS, needs_native, paged_step

from .test_native_gemma import prompts
from .test_native_runner import RTOL, check_incremental, pair, prompt, quantized, rel_err, static_logits, tiny  # noqa: F401

pytestmark = [needs_native, pytest.mark.usefixtures("one_torch_thread")]

D = TINY["hidden_size"] // TINY["num_attention_heads"]


def narrowed(cfg, w, heads, widths):
    """cfg / weights with layer i cut to heads[i] = (query, KV) heads and widths[i] MLP channels
    (the first ones of each: the values do not matter here, only the shapes)."""
    w = dict(w)
    for i, ((q, kv), f) in enumerate(zip(heads, widths)):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = w[p + "self_attn.q_proj.weight"][:q * D].contiguous()
        for n in "kv":
            w[p + f"self_attn.{n}_proj.weight"] = w[p + f"self_attn.{n}_proj.weight"][:kv * D].contiguous()
        w[p + "self_attn.o_proj.weight"] = w[p + "self_attn.o_proj.weight"][:, :q * D].contiguous()
        for n in ("gate", "up"):
            w[p + f"mlp.{n}_proj.weight"] = w[p + f"mlp.{n}_proj.weight"][:f].contiguous()
        w[p + "mlp.down_proj.weight"] = w[p + "mlp.down_proj.weight"][:, :f].contiguous()
    return replace(cfg, layer_heads=tuple(heads), intermediate_sizes=tuple(widths)), w


CASES = {"kv_differ": ([(4, 2), (2, 1)], [64, 32]), "q_differ": ([(2, 2), (4, 2)], [32, 64])}


def packed(w, fmt):
    """The layers' matrices packed in `fmt` where their inputs fill its groups (a 2-head o_proj has
    16), the others fp32: layers mixing packed and fp32 matrices. (The embedding stays fp32: on the
    tiny model a packed one puts some prompts' int8 activations on a rounding tie, where the
    reference's own logits move by 1e-2 when its embedding moves by 1e-7.)"""
    q = quantized({k: v for k, v in w.items() if k.startswith("model.layers.") and v.dim() == 2
                   and v.shape[1] % 32 == 0}, FORMATS[fmt])
    return {**w, **q}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fmt", ["fp32", "q8_0", "q4_0"])
def test_matches_reference(tiny, case, fmt):  # noqa: F811
    cfg, w = narrowed(*tiny, *CASES[case])
    if fmt != "fp32":
        w = packed(w, fmt)
    ref, nat = pair(cfg, w)
    assert supported(ref) is None and isinstance(make_runner(build_model(cfg, dict(w))), NativeRunner)
    kv = PagedKVCache(cfg, num_blocks=2, block_size=4)
    assert [t.shape[1] for t in kv.k] == [kv for _, kv in CASES[case][0]]
    check_incremental(ref, nat, prompt(), rtol=RTOL if fmt == "fp32" else 1e-3)


def test_paged_batch_against_the_reference_paged_path(tiny):  # noqa: F811
    cfg, w = narrowed(*tiny, *CASES["kv_differ"])
    ref, nat = pair(cfg, w)
    ps = prompts(300, 5, 19, 33)
    outs = []
    for runner in (nat, TorchRunner(ref)):
        kv = PagedKVCache(cfg, num_blocks=32, block_size=4)
        seqs = [SeqBlocks() for _ in ps]
        outs.append(paged_step(runner, kv, seqs, [ps[0], ps[1], ps[2][:20]]))
    assert rel_err(outs[0], outs[1]) <= RTOL
    assert rel_err(outs[0][5:24], static_logits(ref, ps[1])) <= RTOL


def test_kv_memory_counts_each_layers_heads(tiny):  # noqa: F811
    cfg, _ = narrowed(*tiny, *CASES["kv_differ"])
    per_block = 2 * (2 + 1) * 16 * D * 4
    assert PagedKVCache.for_memory(cfg, 10 * per_block).pool.num_blocks == 10
    lazy = PagedKVCache(cfg, 3, 16, resident=False)
    assert [t.shape for t in lazy.k] == [(3, 2, 16, D), (3, 1, 16, D)] == [t.shape for t in lazy.v]


def test_bad_per_layer_sizes_refused(tiny):  # noqa: F811
    """A layer wider than the model's buffers, or with heads not a multiple of its KV heads."""
    nat = NativeRunner(build_model(*tiny))
    with pytest.raises(ValueError, match="bad per-layer MLP width or head counts"):
        nat.handle.set_layer(0, [0], [0], 0, [0], 0, 1, 1, 0, 0, 0, intermediate=TINY["intermediate_size"] * 2)
    with pytest.raises(ValueError, match="bad per-layer MLP width or head counts"):
        nat.handle.set_layer(0, [0], [0], 0, [0], 0, 1, 1, 0, 0, 0, num_heads=3, num_kv_heads=2)
