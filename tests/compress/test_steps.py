"""Recipe chains: transform steps run in order around the one quantization step, see the float
model before it and the quantized model after it, are checked before any work, and are logged in
the manifest (jisu.compress.steps)."""
from __future__ import annotations

import json
import os

import pytest
import torch

import jisu
from jisu.compress import steps as steps_mod
from jisu.compress.recipe import RecipeError, parse_recipe
from jisu.errors import JisuError

from .conftest import FAST

O0 = "model.layers.0.self_attn.o_proj.weight"
NORM = "model.norm.weight"


class _ZeroO:
    """zero:N — replaces layer N's o_proj by zeros (before quantization)."""
    form = "zero:N"
    seen = []

    def parse(self, rest, fail):
        if not rest.isdigit():
            raise fail("N must be a layer number")
        return int(rest)

    def check(self, layer, cfg):
        if layer >= cfg.num_layers:
            raise JisuError(f"zero:{layer}: the model has {cfg.num_layers} layers")

    def apply(self, layer, ctx):
        name = f"model.layers.{layer}.self_attn.o_proj.weight"
        assert ctx.quantized is None and ctx.weights[name].dtype == torch.float32
        self.seen.append(("zero", ctx.weights[name].abs().sum().item()))
        ctx.weights[name] = torch.zeros_like(ctx.weights[name])
        return {"zeroed": name}


class _Norm:
    """norm:X — multiplies the final norm by X (after quantization)."""
    form = "norm:X"

    def parse(self, rest, fail):
        try:
            return float(rest)
        except ValueError:
            raise fail("X must be a number") from None

    def check(self, x, cfg):
        pass

    def apply(self, x, ctx):
        assert ctx.quantized is not None and ctx.weights is None
        _ZeroO.seen.append(("norm", x))
        ctx.quantized.tensors[NORM] = ctx.quantized.tensors[NORM] * x
        return {"factor": x}


@pytest.fixture
def registered(monkeypatch):
    steps_mod.transforms()  # the real ones first, into the real registry (they outlive this test)
    monkeypatch.setattr(steps_mod, "TRANSFORMS", dict(steps_mod.TRANSFORMS))
    steps_mod.transform("zero", before=True, after=False)(_ZeroO)
    steps_mod.transform("norm", before=False, after=True)(_Norm)
    _ZeroO.seen.clear()
    yield


def test_parse_order_and_positions(registered):
    r = parse_recipe("zero:1, gptq:w4g32, norm:2")
    assert [s.text for s in r.before] == ["zero:1"] and [s.text for s in r.after] == ["norm:2"]
    assert r.quant.method == "gptq" and r.to_dict()["steps"] == ["zero:1", "quantize", "norm:2"]
    with pytest.raises(RecipeError, match="cannot run after"):
        parse_recipe("rtn:w8,zero:1")
    with pytest.raises(RecipeError, match="cannot run before"):
        parse_recipe("norm:2,rtn:w8")
    with pytest.raises(RecipeError, match="no quantization step"):
        parse_recipe("zero:1")
    with pytest.raises(RecipeError, match="N must be a layer number.*zero:N"):
        parse_recipe("zero:x,rtn:w8")


def test_chain_runs_in_order_and_is_logged(registered, tiny_hf, tmp_path):
    src = jisu.load(tiny_hf)
    norm0 = src.model.w[NORM].clone()
    out = tmp_path / "out"
    r = jisu.compress.compress(tiny_hf, str(out), "zero:0,rtn:w8,norm:0.5", **FAST)
    assert [s[0] for s in _ZeroO.seen] == ["zero", "norm"] and _ZeroO.seen[0][1] > 0
    with open(out / "manifest.json") as f:
        m = json.load(f)
    assert [s["step"] for s in m["steps"]] == ["zero:0", "norm:0.5"]
    assert m["steps"][0]["zeroed"] == O0 and m["steps"][1]["factor"] == 0.5
    assert all(s["cpu_s"] >= 0 and s["wall_s"] >= 0 for s in m["steps"])
    q = jisu.load(str(out))
    w = q.model.w[O0]
    assert torch.count_nonzero(w.dequantize() if hasattr(w, "dequantize") else w) == 0
    assert torch.allclose(q.model.w[NORM], norm0 * 0.5)
    assert r.manifest["quality"]["kld_mean"] > 0   # measured against the untouched source
    assert not os.path.exists(tmp_path / ".out.work")


def test_step_check_fails_before_any_work(registered, tiny_hf, tmp_path):
    with pytest.raises(JisuError, match="zero:99: the model has"):
        jisu.compress.compress(tiny_hf, str(tmp_path / "out"), "zero:99,rtn:w8", **FAST)
    assert _ZeroO.seen == [] and os.listdir(tmp_path) == []
