"""End-to-end tuning (+tune): the scale gradients are exact, tuning lowers the KL it is trained on
and the held-out KLD of a tiny model, and the recipe option parses strictly."""
from __future__ import annotations

import pytest
import torch

import jisu
from jisu.compress.recipe import RecipeError, parse_recipe
from jisu.compress.tune import Tunable, _QLinear, coarse_kl
from jisu.kernels.formats import CodebookWeight, Int3Weight, Int4Weight, Int8Weight

from .conftest import FAST

FORMATS = {
    "w3 sym": lambda w: Int3Weight.quantize_rtn(w, 32, sym=True),
    "w4 asym": lambda w: Int4Weight.quantize_rtn(w, 32, sym=False),
    "int8 per channel": lambda w: Int8Weight.quantize_rtn(w),
    "int8 g32": lambda w: Int8Weight.quantize_rtn(w, 32),
    "nf4 g32": lambda w: CodebookWeight.quantize_rtn(w, 32),
    "kmeans": lambda w: CodebookWeight.quantize_rtn(w, None, codebook="kmeans"),
}


@pytest.mark.parametrize("name", FORMATS)
def test_decoded_weight_and_gradients(name):
    torch.manual_seed(0)
    f = FORMATS[name](torch.randn(6, 64))
    t = Tunable(f)
    s, m = t.scales()
    assert torch.allclose(t.weight(s, m), f.dequantize(), atol=1e-6)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    s = s.double().detach().requires_grad_()
    args = (x, s) + (() if m is None else (m.double().detach().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda *a: _QLinear.apply(a[0], a[1], a[2] if len(a) > 2 else None, t), args)


@pytest.mark.parametrize("name", ["w3 sym", "w4 asym"])
def test_row_blocks_equal_one_block(name, monkeypatch):
    from jisu.compress import tune

    torch.manual_seed(3)
    t = Tunable(FORMATS[name](torch.randn(10, 64)))
    x = torch.randn(2, 5, 64)

    def run():
        xx = x.clone().requires_grad_()
        s, m = (p.detach().requires_grad_() if p is not None else None for p in t.scales())
        y = _QLinear.apply(xx, s, m, t)
        (y * torch.arange(y.numel()).view_as(y).float().sin()).sum().backward()
        return y, xx.grad, s.grad, None if m is None else m.grad

    whole = run()
    monkeypatch.setattr(tune, "ROW_ELEMS", 3 * 64)  # blocks of 3 rows
    assert len(tune._row_blocks(t)) == 4
    for a, b in zip(whole, run()):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("name", FORMATS)
def test_write_back_keeps_the_weights_at_zero_correction(name):
    torch.manual_seed(1)
    f = FORMATS[name](torch.randn(6, 64))
    before = f.dequantize()
    t = Tunable(f)
    t.write_back()
    assert torch.allclose(f.dequantize(), before, atol=1e-3 * before.abs().max())


def test_coarse_kl_is_zero_on_itself_and_a_lower_bound():
    torch.manual_seed(2)
    a, b = torch.randn(5, 100) * 3, torch.randn(5, 100) * 3
    lp = torch.log_softmax(a, -1)
    v, ix = lp.topk(8, -1)
    assert float(coarse_kl(a, v, ix)) == pytest.approx(0.0, abs=1e-6)
    full = (lp.exp() * (lp - torch.log_softmax(b, -1))).sum(-1).mean()
    coarse = coarse_kl(b, v, ix)
    assert 0 < float(coarse) <= float(full) + 1e-6


def test_tuning_lowers_calibration_kl_and_heldout_kld(tiny_hf_tied, tmp_path):
    base = jisu.compress.compress(tiny_hf_tied, str(tmp_path / "base"), "rtn:w3g32+embed=w4g32+head=w4g32", **FAST)
    tuned = jisu.compress.compress(tiny_hf_tied, str(tmp_path / "tuned"), "rtn:w3g32+embed=w4g32+head=w4g32+tune=24",
                          **FAST)
    info = tuned.manifest["quantize_info"]["tune"]
    assert info["kept"] and info["calib_kl_after"] < 0.8 * info["calib_kl_before"]
    assert tuned.quality["kld_mean"] < base.quality["kld_mean"]
    assert tuned.manifest["recipe"]["tune"] == 24
    # the tuned artifact loads and runs like any other
    m = jisu.load(tuned.path)
    assert len(m.generate("the", max_tokens=4, temperature=0, ignore_eos=True).token_ids) == 4


def test_recipe_option():
    assert parse_recipe("gptq:w3g32+tune").tune == 64
    assert parse_recipe("gptq:w3g32+embed=w4g32+tune=10").tune == 10
    assert parse_recipe("rtn:w4g32+tune=3").needs_calibration
    assert parse_recipe("gptq:w4g32").tune == 0
    for bad in ("gptq:w3g32+tune=0", "gptq:w3g32+tune=x", "gptq:w3g32+tune=1.5", "gptq:w3g32+tune=100000"):
        with pytest.raises(RecipeError, match="tune"):
            parse_recipe(bad)
