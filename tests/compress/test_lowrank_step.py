"""`lowrank:rank=R` as a compressor: each decoder linear becomes int8 rank-R factors of its
activation-whitened SVD, kept by the quantization step that follows; a rank that would not save
values is refused in one line before any work."""
from __future__ import annotations

import json
import os

import pytest
import torch

import jisu
from jisu.compress.lowrank_step import saving_rank
from jisu.compress.recipe import RecipeError, parse_recipe
from jisu.errors import JisuError
from jisu.io.artifact import load_formats
from jisu.kernels.lowrank import LowRankWeight, PackedLowRank

from .conftest import FAST

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_parse_and_saving_rank():
    r = parse_recipe("lowrank:rank=8,gptq:w4g32")
    assert r.before[0].params == 8
    for bad in ("lowrank:rank=0,gptq:w4g32", "lowrank:r=8,gptq:w4g32", "lowrank:rank=x,rtn:w8",
                "gptq:w4g32,lowrank:rank=8"):
        with pytest.raises(RecipeError):
            parse_recipe(bad)
    assert saving_rank(576, 576) == 287 and saving_rank(192, 576) == 143
    assert 287 * (576 + 576) < 576 * 576 <= 288 * (576 + 576)


def test_rank_that_saves_nothing_is_refused(tiny_hf, tmp_path):
    # k_proj of the tiny model is 32 x 64: rank 22 holds 22 * 96 = 2112 values >= 2048
    with pytest.raises(JisuError) as e:
        jisu.compress.compress(tiny_hf, str(tmp_path / "out"), "lowrank:rank=22,rtn:w8", **FAST)
    assert "saving bytes needs rank <= 21" in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "out")


def test_factored_model(tiny_hf, tmp_path):
    r = 8
    out = str(tmp_path / "lr")
    res = jisu.compress.compress(tiny_hf, out, f"lowrank:rank={r},gptq:w4g32", **FAST)
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    assert m["steps"][0]["step"] == f"lowrank:rank={r}" and 0 < m["steps"][0]["kept"] < 1
    formats, _ = load_formats(out)
    lin = [n for n in formats if n.endswith("_proj.weight")]
    for n in lin:
        fmt = formats[n]
        assert isinstance(fmt, LowRankWeight) and fmt.base is None and fmt.factors.rank == r
        N, K = m["tensors"][n]["shape"]
        assert m["tensors"][n]["format"] == "lowrank"
        assert m["tensors"][n]["bytes"] == r * (N + K) + 2 * (N + r)
    assert m["bits_per_weight"]["linear"] < 8
    llm = jisu.load(out)
    assert isinstance(llm.model.w[lin[0]], PackedLowRank)
    assert torch.isfinite(torch.tensor(res.manifest["quality"]["kld_mean"]))


def test_factored_then_mixed_is_refused(tiny_hf, tmp_path):
    with pytest.raises(JisuError, match="kept by rtn or gptq"):
        jisu.compress.compress(tiny_hf, str(tmp_path / "out"), "lowrank:rank=4,mixed:bpw=4", **FAST)
