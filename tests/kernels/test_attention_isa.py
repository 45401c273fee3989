"""The native step's attention on every ISA, with head sizes that take the AVX-512 kernel (D a
multiple of 16: whole 64-dim passes and remainders of 16 / 32 / 48) and up to 7 query heads per
KV head: the AVX-512 and AVX2 kernels give the same bits, and both agree with the scalar path and
the reference model, on fp32 and fp16 caches, over block sizes that split the 8-position groups
of the AVX-512 kernel and prompt lengths that leave partial groups."""
from __future__ import annotations

import pytest
import torch

from jisu.config import ModelConfig
from jisu.engine.kv_cache import PagedKVCache, SeqBlocks
from jisu.engine.native_runner import NativeRunner
from jisu.engine.runner import TorchRunner
from jisu.models import build_model
from tests.fixtures import tiny_weights

from .helpers import ISAS, isa, needs_native, paged_step

pytestmark = [needs_native, pytest.mark.usefixtures("one_torch_thread")]


def model_pair(head_dim: int, heads: int, kv_heads: int):
    shape = dict(vocab_size=97, hidden_size=heads * head_dim, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=heads, num_key_value_heads=kv_heads)
    w = tiny_weights(seed=head_dim + heads, cfg=shape)
    cfg = ModelConfig(arch="llama", vocab_size=97, hidden_size=heads * head_dim, intermediate_size=64, num_layers=2,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-5, max_position=256)
    return TorchRunner(build_model(cfg, dict(w))), NativeRunner(build_model(cfg, dict(w))), cfg


def batched(nat, cfg, prompts, dtype, block_size):
    """Prefill of all prompts in one paged step, then one decode token each, then the rest of the
    longest prompt's continuation: every row's logits."""
    kv = PagedKVCache(cfg, num_blocks=96, block_size=block_size, dtype=dtype)
    seqs = [SeqBlocks() for _ in prompts]
    out = [paged_step(nat, kv, seqs, prompts)]
    out.append(paged_step(nat, kv, seqs, [[5], [6], [7]]))
    return torch.cat(out)


@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 9, 3), (16, 7, 1), (48, 4, 2), (80, 2, 1), (128, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_same_on_every_isa(head_dim, heads, kv_heads, dtype):
    ref, nat, cfg = model_pair(head_dim, heads, kv_heads)
    g = torch.Generator().manual_seed(head_dim)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (1, 13, 42)]
    got = {}
    for name in ISAS:
        with isa(name):
            got[name] = {bs: batched(nat, cfg, prompts, dtype, bs) for bs in (3, 16)}
    for name, by_bs in got.items():
        # block size never changes a bit
        assert torch.equal(by_bs[3], by_bs[16]), name
    if "avx512" in got and "avx2" in got:
        assert torch.equal(got["avx512"][16], got["avx2"][16])
    # the reference model over the same cache dtype (a K/V value a rounding away from a half's
    # midpoint may round the other way there: one half ulp, ~5e-4 relative)
    want = batched(ref, cfg, prompts, dtype, 16)
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    for name, by_bs in got.items():
        err = float((by_bs[16] - want).abs().max() / want.abs().max())
        assert err <= tol, (name, err)
