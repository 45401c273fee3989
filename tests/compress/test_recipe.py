"""Recipe strings -> dataclasses; every ill-formed recipe is one RecipeError line listing the valid forms."""
from __future__ import annotations

import pytest

from jisu.compress.recipe import FormatSpec, RecipeError, parse_recipe
from jisu.errors import JisuError


@pytest.mark.parametrize("text, method, fmt", [
    ("rtn:w8", "rtn", FormatSpec("int", 8, None)),
    ("rtn:w8g32", "rtn", FormatSpec("int", 8, 32)),
    ("rtn:w4g32", "rtn", FormatSpec("int", 4, 32, True)),
    ("rtn:w4g32a", "rtn", FormatSpec("int", 4, 32, False)),
    ("rtn:w3g32", "rtn", FormatSpec("int", 3, 32)),
    ("rtn:w2g64", "rtn", FormatSpec("int", 2, 64)),
    ("gptq:w4g32", "gptq", FormatSpec("int", 4, 32)),
    ("GPTQ : w3g128a", "gptq", FormatSpec("int", 3, 128, False)),
    ("awq:w4g64", "awq", FormatSpec("int", 4, 64)),
    ("nf4:g64", "rtn", FormatSpec("nf4", 4, 64)),
    ("kmeans:g64", "rtn", FormatSpec("kmeans", 4, 64)),
    ("kmeans", "rtn", FormatSpec("kmeans", 4, None)),
    ("gptq:nf4g64", "gptq", FormatSpec("nf4", 4, 64)),
])
def test_valid_recipes(text, method, fmt):
    r = parse_recipe(text)
    assert r.quant.method == method and r.quant.fmt == fmt
    assert r.embed is None and r.head is None
    assert r.needs_calibration == (method in ("gptq", "awq"))


def test_options_and_mixed():
    r = parse_recipe("gptq:w4g32:noact:damp=0.05+embed+head=w8")
    assert not r.quant.act_order and r.quant.damp == 0.05
    assert r.embed == FormatSpec("int", 4, 32) and r.head == FormatSpec("int", 8, None)
    m = parse_recipe("mixed:bpw=3.5")
    assert m.quant.method == "mixed" and m.quant.bpw == 3.5 and m.quant.base == "gptq" and m.quant.group_size == 32
    assert set(m.quant.mixed_choices()) == {2, 3, 4, 8}
    m = parse_recipe("mixed:bpw=4:g64:rtn+head")
    assert m.quant.group_size == 64 and m.quant.base == "rtn" and m.head == FormatSpec("int", 8, None)
    assert m.to_dict()["bpw"] == 4.0
    m = parse_recipe("mixed:bpw=4.5:w4")
    choices = m.quant.mixed_choices()
    assert [s.name for s in choices.values()] == ["w4g128", "w4g64", "w4g32", "w8"]
    assert list(choices) == sorted(choices)  # widths ordered by size, as the allocation needs
    assert m.to_dict()["choices"] == ["w4g128", "w4g64", "w4g32", "w8"]
    m = parse_recipe("mixed:bpw=4.2:groups")
    choices = m.quant.mixed_choices()
    assert [s.name for s in choices.values()] == ["w2g32", "w3g64", "w3g32", "w4g64", "w4g32", "w8"]
    assert list(choices) == [2.5, 3.25, 3.5, 4.25, 4.5, 8]  # keyed by bits per weight, ordered by size
    m = parse_recipe("mixed:bpw=4.2:groups:max=4.5")
    assert list(m.quant.mixed_choices()) == [2.5, 3.25, 3.5, 4.25, 4.5]
    assert m.to_dict()["choices"] == ["w2g32", "w3g64", "w3g32", "w4g64", "w4g32"]
    with pytest.raises(RecipeError, match="fewer than two widths"):
        parse_recipe("mixed:bpw=3:max=2")
    with pytest.raises(RecipeError, match="choose the group sizes themselves"):
        parse_recipe("mixed:bpw=4:groups:g64")
    with pytest.raises(RecipeError, match="one of :w4 and :groups"):
        parse_recipe("mixed:bpw=4:w4:groups")


@pytest.mark.parametrize("text, problem", [
    ("", "empty recipe"),
    ("foo:w4g32", "unknown step 'foo'"),
    ("rtn:w5g32", "unknown format"),
    ("rtn:w4", "need a group size"),
    ("rtn:w4g48", "group size must be one of"),
    ("rtn:w8a", "symmetric only"),
    ("gptq:w4g32:fast", "unknown gptq option"),
    ("mixed:g32", "needs a budget"),
    ("mixed:bpw=1", "outside"),
    ("mixed:bpw=abc", "not a number"),
    ("rtn:w4g32+tail", "unknown option"),
    ("rtn:w4g32,gptq:w4g32", "only one quantization step"),
    ("gptq:w4g32,frob:2:4", "unknown step 'frob'"),
    ("gptq:w4g32,prune:layers=2", "cannot run after the quantization step"),
    ("prune:2:4,gptq:w4g32", "say what to keep"),
    ("awq:nf4g64", "awq supports integer formats"),
    ("rtn:w4g32,", "empty step"),
])
def test_bad_recipes_one_line(text, problem):
    with pytest.raises(RecipeError) as e:
        parse_recipe(text)
    msg = str(e.value)
    assert problem in msg and "\n" not in msg and "valid forms:" in msg
    assert isinstance(e.value, JisuError)


@pytest.mark.parametrize("name, K, bpw", [("w4g32", 576, 4.5), ("w4g32a", 576, 5.0), ("w3g32", 576, 3.5),
                                          ("w2g64", 576, 2.25), ("w8", 576, 8 + 32 / 576), ("nf4g64", 576, 4.25)])
def test_bits_per_weight(name, K, bpw):
    assert parse_recipe("rtn:" + name).quant.fmt.bits_per_weight(K) == pytest.approx(bpw)
