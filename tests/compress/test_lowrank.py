"""Low-rank error correction of quantized linears (jisu.compress.lowrank): a planted low-rank error is
recovered exactly, the activation-whitened factors beat a plain SVD in the inputs' metric, the
recipe option parses and is checked before any work, and the factors survive the artifact with
their bytes counted in the bits per weight."""
from __future__ import annotations

import json
import os

import pytest
import torch

import jisu
from jisu.compress import lowrank
from jisu.compress.gptq import hessian_from
from jisu.compress.recipe import RecipeError, parse_recipe
from jisu.errors import JisuError
from jisu.io.artifact import load_formats
from jisu.kernels.formats import Int3Weight, Int4Weight
from jisu.kernels.lowrank import Factors, LowRankWeight, PackedLowRank
from jisu.kernels.packed import pack

from .conftest import FAST

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inputs(n: int, K: int, seed: int = 0, spread: float = 3.0) -> torch.Tensor:
    """Calibration inputs [n, K] with correlated columns of very different scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K ** 0.5 + torch.eye(K)
    return (torch.randn(n, K, generator=g) @ mix) * torch.logspace(-spread / 2, spread / 2, K)


def _planted(N=48, K=64, r=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = Int3Weight.quantize_rtn(torch.randn(N, K, generator=g), 32)       # Q on its grid
    A0, B0 = torch.randn(N, r, generator=g), torch.randn(r, K, generator=g) * 0.05
    return q, A0 @ B0, q.dequantize() + A0 @ B0


def test_planted_low_rank_error_is_recovered_exactly():
    q, E0, w = _planted()
    H = hessian_from(_inputs(512, 64))
    white = lowrank.Whitening(H)
    A, B = lowrank.factor(w - q.dequantize(), 4, white)
    assert A.shape == (48, 4) and B.shape == (4, 64)
    assert float((A @ B - E0).norm() / E0.norm()) < 1e-5
    # a higher rank finds nothing more to add
    A8, B8 = lowrank.factor(w - q.dequantize(), 8, white)
    assert float((A8 @ B8 - E0).norm() / E0.norm()) < 1e-5
    # stored as int8 factors (B rounded, A refit to it, rounded): the residual shrinks ~100x
    fixed = lowrank.correct(w, q, white, 4)
    assert isinstance(fixed, LowRankWeight) and fixed.factors.rank == 4
    before = lowrank.error(w - q.dequantize(), H)
    after = lowrank.error(w - fixed.dequantize(), H)
    assert after < 1e-3 * before


def test_whitened_beats_plain_svd_in_the_inputs_metric():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(96, 128, generator=g)
    q = Int3Weight.quantize_rtn(w, 32)
    E = w - q.dequantize()
    H = hessian_from(_inputs(1024, 128, seed=3))
    white = lowrank.Whitening(H)
    for r in (4, 16):
        Aw, Bw = lowrank.factor(E, r, white)
        Ap, Bp = lowrank.factor(E, r, None)
        err_w, err_p, err_0 = lowrank.error(E - Aw @ Bw, H), lowrank.error(E - Ap @ Bp, H), lowrank.error(E, H)
        assert err_w < 0.9 * err_p < 0.9 * err_0
        # and the plain SVD is the better one in the plain Frobenius norm (each is optimal in its own)
        assert (E - Ap @ Bp).norm() <= (E - Aw @ Bw).norm()


def test_packed_low_rank_linear_is_base_plus_product():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(40, 64, generator=g)
    q = Int4Weight.quantize_rtn(w, 32)
    f = Factors.quantize(torch.randn(40, 3, generator=g), torch.randn(3, 64, generator=g))
    p = pack(LowRankWeight(q, f))
    assert isinstance(p, PackedLowRank) and p.rank == 3
    x = torch.randn(5, 64, generator=g)
    want = x @ (q.dequantize() + f.product()).T
    assert float((p.linear(x) - want).abs().max() / want.abs().max()) < 2e-2   # int8 activations of the base
    assert torch.allclose(p.dequantize(), q.dequantize() + f.product(), atol=1e-5)
    # factor-only (no base)
    p0 = pack(LowRankWeight(None, f))
    assert torch.allclose(p0.linear(x), x @ f.product().T, atol=1e-4, rtol=1e-4)


def test_recipe_option():
    r = parse_recipe("gptq:w3g32+lowrank=16+embed=w4g32+head=w4g32")
    assert r.lowrank == 16 and r.quant.lowrank == 16 and r.to_dict()["lowrank"] == 16
    assert parse_recipe("rtn:w3g32+lowrank=4").needs_calibration
    assert parse_recipe("gptq:w4g32").lowrank == 0 and "lowrank" not in parse_recipe("gptq:w4g32").to_dict()
    for bad in ("gptq:w3g32+lowrank", "gptq:w3g32+lowrank=0", "gptq:w3g32+lowrank=x", "awq:w4g32+lowrank=8",
                "gptq:w3g32+lowrank=8+tune"):
        with pytest.raises(RecipeError) as e:
            parse_recipe(bad)
        assert "\n" not in str(e.value)


def test_rank_too_large_fails_before_work(tiny_hf, tmp_path):
    # the tiny model's k/v projections are 32 x 64: rank 32 cannot be below min(N, K)
    with pytest.raises(JisuError, match="rank must be below 32"):
        jisu.compress.compress(tiny_hf, str(tmp_path / "out"), "gptq:w4g32+lowrank=32", **FAST)
    assert not os.path.exists(tmp_path / "out")


def test_artifact_round_trip_and_bits(tiny_hf, tmp_path):
    r = 4
    out = str(tmp_path / "lr")
    res = jisu.compress.compress(tiny_hf, out, f"gptq:w4g32+lowrank={r}", **FAST)
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    formats, _ = load_formats(out)
    lin = [n for n in formats if n.endswith("_proj.weight")]
    assert lin and all(isinstance(formats[n], LowRankWeight) for n in lin)
    linear_bytes = 0
    for n in lin:
        N, K = m["tensors"][n]["shape"]
        assert m["tensors"][n]["lowrank"] == r
        fa = formats[n].factors
        assert fa.a.shape == (N, r) and fa.b.shape == (r, K) and fa.a.dtype == torch.int8
        # int4 g32 codes and float16 scales, int8 factors and their float16 scales
        expect = N * K // 2 + 2 * N * K // 32 + r * (N + K) + 2 * (N + r)
        assert m["tensors"][n]["bytes"] == expect
        linear_bytes += expect
    assert m["params"]["linear_bytes"] == linear_bytes
    n_lin = sum(m["tensors"][n]["shape"][0] * m["tensors"][n]["shape"][1] for n in lin)
    assert m["bits_per_weight"]["linear"] == pytest.approx(linear_bytes * 8 / n_lin)
    assert m["bits_per_weight"]["linear"] > 4.5
    assert m["recipe"]["lowrank"] == r
    # loaded: the runtime weights carry the factors; the model runs them
    llm = jisu.load(out)
    assert all(isinstance(llm.model.w[n], PackedLowRank) for n in lin)
    assert type(llm.runner).__name__ == "NativeRunner"
    assert res.manifest["quality"]["kld_mean"] >= 0


def test_correction_lowers_the_layer_error(tiny_hf, tmp_path):
    """Every linear's calibration error with the correction is below the plain GPTQ one."""
    errs = {}
    for rec in ("gptq:w3g32", "gptq:w3g32+lowrank=8"):
        out = str(tmp_path / rec.replace(":", "_").replace("+", "_").replace("=", "_"))
        jisu.compress.compress(tiny_hf, out, rec, **FAST)
        with open(os.path.join(out, "manifest.json")) as f:
            errs[rec] = json.load(f)["layers"]
    base, fixed = errs["gptq:w3g32"], errs["gptq:w3g32+lowrank=8"]
    below = [n for n in base if fixed[n]["err"] < base[n]["err"]]
    assert len(below) >= 0.9 * len(base)
