"""The fp16 KV cache: the native step rounds K/V to IEEE half exactly as torch's .half() does
(F16C and the portable code), reads them back exactly, and gives the reference model's numbers
on the same fp16 cache; batch invariance holds; quantized models get fp16 by default, fp32
weights, --precise and the reference path fp32."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from jisu.engine.config import EngineConfig
from jisu.engine.engine import Engine, EngineError
from jisu.engine.kv_cache import PagedKVCache, SeqBlocks
from jisu.engine.native_runner import NativeRunner
from jisu.engine.runner import TorchRunner, resolve_kv_dtype, sequence_logits
from jisu.io.sources import load_weights, resolve
from jisu.kernels import _native, ops
from jisu.kernels.packed import pack
from jisu.models import build_model

from .helpers import FORMATS, ISAS, isa, needs_native, paged_step

pytestmark = [needs_native, pytest.mark.usefixtures("one_torch_thread")]

RTOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.fixtures import write_hf_llama

    cfg, w, _ = load_weights(resolve(write_hf_llama(str(tmp_path_factory.mktemp("kvhalf") / "hf"))))
    return cfg, w


def native_half(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float16)
    _native.K.to_half(x.data_ptr(), out.data_ptr(), x.numel())
    return out


def special_values() -> torch.Tensor:
    f16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    exact = torch.from_numpy(f16[np.isfinite(f16)].astype(np.float32))
    up = torch.nextafter(exact, torch.full_like(exact, float("inf")))
    down = torch.nextafter(exact, torch.full_like(exact, -float("inf")))
    # midpoints between neighbouring halves (ties go to even) and the floats around them
    srt = torch.sort(exact.unique()).values
    mid = ((srt[1:].double() + srt[:-1].double()) / 2).float()
    mid_up = torch.nextafter(mid, torch.full_like(mid, float("inf")))
    mid_dn = torch.nextafter(mid, torch.full_like(mid, -float("inf")))
    big = torch.tensor([65504.0, 65519.996, 65520.0, 65536.0, 1e6, 3e38, float("inf"), -float("inf"),
                        1e-45, -1e-45, 1e-40, 2.0 ** -25, 2.0 ** -24, 2.0 ** -24 * 1.5, -0.0, 0.0])
    g = torch.Generator().manual_seed(0)
    rnd = torch.randn(100_003, generator=g) * torch.exp(torch.randn(100_003, generator=g) * 6)
    return torch.cat([exact, up, down, mid, mid_up, mid_dn, big, rnd])


@pytest.mark.parametrize("name", ISAS)
def test_to_half_rounds_like_torch(name):
    x = special_values()
    with isa(name):
        got = native_half(x)
    want = x.half()
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    nan = native_half(torch.tensor([float("nan"), -float("nan")] * 8))
    assert torch.isnan(nan.float()).all()


@pytest.mark.parametrize("which", ["fp32", "q4_0"])
def test_half_cache_native_equals_reference(tiny, which):
    cfg, w = tiny
    if which != "fp32":
        w = {k: (pack(FORMATS[which](v)) if v.dim() == 2 else v) for k, v in w.items()}
    ref = TorchRunner(build_model(cfg, dict(w)))
    nat = NativeRunner(build_model(cfg, dict(w)))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (7, 21)]
    outs, caches = {}, {}
    for name, model, dtype in [("nat16", nat, torch.float16), ("ref16", ref, torch.float16),
                               ("nat32", nat, torch.float32)]:
        kv = PagedKVCache(cfg, num_blocks=32, block_size=4, dtype=dtype)
        seqs = [SeqBlocks() for _ in prompts]
        a = paged_step(model, kv, seqs, [prompts[0], prompts[1][:13]])
        b = paged_step(model, kv, seqs, [[5], prompts[1][13:]])
        outs[name] = torch.cat([a, b])
        caches[name] = kv, seqs
    # layer 0's K/V come from the same inputs: the fp16 cache holds their .half()
    (kv16, seqs16), (kv32, seqs32) = caches["nat16"], caches["nat32"]
    for s16, s32 in zip(seqs16, seqs32):
        assert s16.block_table == s32.block_table
        for c16, c32 in ((kv16.k[0], kv32.k[0]), (kv16.v[0], kv32.v[0])):
            assert torch.equal(c16[s16.block_table].view(torch.int16), c32[s32.block_table].half().view(torch.int16))
    scale = float(outs["ref16"].abs().max())
    assert float((outs["nat16"] - outs["ref16"]).abs().max()) <= RTOL * scale
    if which == "fp32":  # (with int8 activations the tiny random model amplifies any change)
        # the half cache's rounding moves the logits a little, not a lot
        assert float((outs["nat16"] - outs["nat32"]).abs().max()) <= 2e-2 * scale
    # a one-block fp16 cache through the native step: bitwise the paged rows
    st = sequence_logits(nat, prompts[1], kv_dtype=torch.float16)
    assert torch.equal(st[:13], outs["nat16"][7:20]) and torch.equal(st[13:], outs["nat16"][21:])


def test_half_cache_batch_invariance(tiny):
    cfg, w = tiny
    nat = NativeRunner(build_model(cfg, dict(w)))
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (4, 12, 9)]
    steps = 8

    def decode(ps):
        kv = PagedKVCache(cfg, num_blocks=64, block_size=4, dtype=torch.float16)
        seqs = [SeqBlocks() for _ in ps]
        ends = np.cumsum([len(p) for p in ps]) - 1
        out = paged_step(nat, kv, seqs, ps, ends.tolist())
        got = [out]
        for _ in range(steps - 1):
            out = paged_step(nat, kv, seqs, [[int(o.argmax())] for o in out])
            got.append(out)
        return torch.stack(got, 1)  # [seq, step, V]

    batched = decode(prompts)
    for i, p in enumerate(prompts):
        assert torch.equal(decode([p])[0], batched[i])


def test_engine_kv_dtype_choice(tiny):
    cfg, w = tiny
    ref = TorchRunner(build_model(cfg, dict(w)))
    assert NativeRunner(build_model(cfg, dict(w))).kv_dtype == torch.float32  # fp32 weights
    nat = NativeRunner(build_model(cfg, {k: (pack(FORMATS["q4_0"](v)) if v.dim() == 2 else v)
                                         for k, v in w.items()}))
    assert resolve_kv_dtype(nat, None) == torch.float16
    assert resolve_kv_dtype(nat, "auto") == torch.float16
    assert resolve_kv_dtype(ref, None) == torch.float32
    assert resolve_kv_dtype(nat, "f32") == torch.float32
    assert resolve_kv_dtype(ref, torch.float16) == torch.float16
    with pytest.raises(EngineError, match="unknown KV cache dtype"):
        resolve_kv_dtype(nat, "int8")
    with pytest.raises(EngineError, match="float32 or float16"):
        resolve_kv_dtype(nat, torch.bfloat16)
    old = ops.get_act_refine()
    ops.set_act_refine(ops.PRECISE)
    try:
        assert resolve_kv_dtype(nat, None) == torch.float32
    finally:
        ops.set_act_refine(old)
    # the same megabytes hold twice the blocks in fp16
    e16 = Engine(nat, config=EngineConfig(kv_memory_mb=4))
    e32 = Engine(nat, config=EngineConfig(kv_memory_mb=4, kv_dtype="f32"))
    assert e16.kv.k[0].dtype == torch.float16 and e32.kv.k[0].dtype == torch.float32
    assert e16.kv.pool.num_blocks == 2 * e32.kv.pool.num_blocks
