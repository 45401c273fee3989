"""Structured pruning steps (jisu.compress.prune): a pruned model computes what the unpruned one
computes with those layers skipped or those channels / heads zeroed; the refit lowers each layer's
output error; bad budgets fail in one line before any work."""
from __future__ import annotations

import os

import pytest
import torch

import jisu
from jisu.compress.recipe import RecipeError, parse_recipe
from jisu.compress.steps import StepContext, Teacher
from jisu.config import ModelConfig
from jisu.errors import JisuError
from jisu.models.layers import CausalContext
from jisu.models.llama import LlamaModel
from tests.fixtures import tiny_weights

from .conftest import CFG, FAST

LAYERS = 4
SHAPE = {**CFG, "num_hidden_layers": LAYERS}
D = CFG["hidden_size"] // CFG["num_attention_heads"]
TOKENS = torch.randint(0, CFG["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(5))


def config() -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=CFG["vocab_size"], hidden_size=CFG["hidden_size"],
                       intermediate_size=CFG["intermediate_size"], num_layers=LAYERS,
                       num_heads=CFG["num_attention_heads"], num_kv_heads=CFG["num_key_value_heads"],
                       head_dim=D, rms_norm_eps=1e-5)


def pruned(step: str, weights: dict | None = None):
    """(cfg, weights, info) after one prune step on the 4-layer tiny model."""
    cfg = config()
    w = weights if weights is not None else tiny_weights(0, SHAPE)
    ids = torch.randint(0, CFG["vocab_size"], (16, 32), generator=torch.Generator().manual_seed(1))
    st = parse_recipe(step + ",rtn:w8").before[0]
    st.transform.impl.check(st.params, cfg)
    ctx = StepContext(cfg, dict(w), Teacher(cfg, w), ids)
    info = st.transform.impl.apply(st.params, ctx)
    return ctx.cfg, ctx.weights, info


def logits(cfg, w, layers=None) -> torch.Tensor:
    model = LlamaModel(cfg, dict(w))
    ctx = CausalContext()
    if layers is None:
        return model.forward(TOKENS, ctx)
    x = model.embed(TOKENS)
    for i in layers:
        x = model.layer(i, x, ctx)
    return model.head(model.final_hidden(x))


@pytest.mark.parametrize("by", ["bi", "kl"])
def test_layers_equal_the_model_with_them_skipped(by):
    w = tiny_weights(0, SHAPE)
    cfg, pw, info = pruned(f"prune:layers=2:by={by}:refit=0", w)
    assert cfg.num_layers == 2 and len(info["importance"]) == LAYERS and len(info["kept"]) == 2
    assert not any(k.startswith(("model.layers.2.", "model.layers.3.")) for k in pw)
    torch.testing.assert_close(logits(cfg, pw), logits(config(), w, info["kept"]), rtol=0, atol=0)


@pytest.mark.parametrize("by", ["bi", "kl"])
def test_an_identity_layer_goes_first(by):
    w = tiny_weights(0, SHAPE)
    for n in ("self_attn.o_proj", "mlp.down_proj"):
        w[f"model.layers.1.{n}.weight"] = torch.zeros_like(w[f"model.layers.1.{n}.weight"])
    _, _, info = pruned(f"prune:layers=3:by={by}", w)
    assert info["removed"] == [1] and info["importance"][1] == pytest.approx(0, abs=1e-6)


def test_refit_needs_enough_calibration_tokens():
    """Fewer than TOKENS_PER_INPUT tokens per fitted input: the plain slice, and the step says so."""
    from jisu.compress import prune_width

    cfg = config()
    w = tiny_weights(0, SHAPE)
    ids = torch.randint(0, CFG["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1))
    st = parse_recipe("prune:ffn=64,rtn:w8").before[0]
    ctx = StepContext(cfg, dict(w), Teacher(cfg, w), ids)
    info = st.transform.impl.apply(st.params, ctx)
    assert not info["refit"] and "64 calibration tokens" in info["refit_skipped"]
    assert 64 < prune_width.TOKENS_PER_INPUT * 64
    keep = _kept_rows(ctx.weights["model.layers.0.mlp.gate_proj.weight"], w["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(ctx.weights["model.layers.0.mlp.down_proj.weight"], w["model.layers.0.mlp.down_proj.weight"][:, keep])


def test_layer_refit_matches_the_skipped_run_better():
    cfg, pw, info = pruned("prune:layers=2")
    fits = info["refit"]
    assert fits and all(f["err_after"] < f["err_before"] for f in fits)
    d = f"model.layers.{info['kept'].index(fits[0]['layer'])}.mlp.down_proj.weight"
    assert not torch.equal(pw[d], tiny_weights(0, SHAPE)[f"model.layers.{fits[0]['layer']}.mlp.down_proj.weight"])


def _kept_rows(new: torch.Tensor, old: torch.Tensor) -> list[int]:
    return [int((old == r).all(1).nonzero()[0]) for r in new]


def test_ffn_equals_zeroed_channels():
    w = tiny_weights(0, SHAPE)
    cfg, pw, info = pruned("prune:ffn=64:refit=0", w)
    assert cfg.intermediate_size == 64 and cfg.intermediate_sizes == () and info["widths"] == [64] * LAYERS
    zeroed = dict(w)
    for i in range(LAYERS):
        p = f"model.layers.{i}.mlp."
        keep = _kept_rows(pw[p + "gate_proj.weight"], w[p + "gate_proj.weight"])
        assert keep == sorted(keep) and len(keep) == 64
        assert torch.equal(pw[p + "up_proj.weight"], w[p + "up_proj.weight"][keep])
        drop = [c for c in range(CFG["intermediate_size"]) if c not in keep]
        zeroed[p + "down_proj.weight"] = w[p + "down_proj.weight"].clone()
        zeroed[p + "down_proj.weight"][:, drop] = 0
    torch.testing.assert_close(logits(cfg, pw), logits(config(), zeroed), rtol=1e-5, atol=1e-5)


def test_ffn_spread_keeps_the_budget_in_groups():
    cfg, pw, info = pruned("prune:ffn=64:spread")
    widths = info["widths"]
    assert sum(widths) == 64 * LAYERS and all(v % 32 == 0 and 32 <= v <= 128 for v in widths)
    assert [cfg.mlp_width(i) for i in range(LAYERS)] == widths
    assert all(pw[f"model.layers.{i}.mlp.down_proj.weight"].shape == (64, v) for i, v in enumerate(widths))


def test_heads_equal_zeroed_heads_per_kv_group():
    w = tiny_weights(0, SHAPE)
    cfg, pw, info = pruned("prune:heads=2:refit=0", w)
    assert (cfg.num_heads, cfg.num_kv_heads) == (2, 2)
    zeroed = dict(w)
    for rec in info["layers"]:
        keep = rec["kept"]
        assert [h // 2 for h in keep] == [0, 1]  # one query head of each KV group (2 heads per group)
        o = f"model.layers.{rec['layer']}.self_attn.o_proj.weight"
        zeroed[o] = w[o].clone()
        for h in set(range(4)) - set(keep):
            zeroed[o][:, h * D:(h + 1) * D] = 0
    torch.testing.assert_close(logits(cfg, pw), logits(config(), zeroed), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("step", ["prune:ffn=64", "prune:heads=2"])
def test_refit_lowers_every_layers_output_error(step):
    _, _, info = pruned(step)
    assert len(info["layers"]) == LAYERS
    assert all(r["err_after"] < r["err_before"] for r in info["layers"])


@pytest.mark.parametrize("recipe, message", [
    ("prune:layers=0,rtn:w8", "must be a positive integer"),
    ("prune:depth=3,rtn:w8", "say what to keep"),
    ("prune:ffn=64:by=kl,rtn:w8", "unknown option 'by=kl' for prune:ffn"),
    ("rtn:w8,prune:layers=1", "cannot run after"),
])
def test_bad_steps_are_one_line(recipe, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe)


@pytest.mark.parametrize("recipe, message", [
    ("prune:layers=2,rtn:w8", "the model has 2 layers; keeping 2 removes nothing"),
    ("prune:ffn=128,rtn:w8", "the MLP is 128 wide; this removes nothing"),
    ("prune:ffn=48,rtn:w8", "must be a multiple of 32"),
    ("prune:heads=3,rtn:w8", "3 query heads are not a multiple of the 2 KV heads"),
    ("prune:heads=4,rtn:w8", "the layers have 4 heads; this removes nothing"),
])
def test_bad_budgets_fail_before_any_work(tiny_hf, tmp_path, recipe, message):
    with pytest.raises(JisuError, match=message):
        jisu.compress.compress(tiny_hf, str(tmp_path / "out"), recipe, **FAST)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("recipe", ["prune:layers=1,gptq:w4g32", "prune:ffn=64:spread,prune:heads=2,rtn:w8"])
def test_pruned_artifact_loads_runs_natively_and_generates(tiny_hf, tmp_path, recipe):
    from jisu.engine.native_runner import NativeRunner
    from jisu.engine.runner import sequence_logits

    out = str(tmp_path / "out")
    r = jisu.compress.compress(tiny_hf, out, recipe, **FAST)
    assert [s["step"] for s in r.manifest["steps"]] == recipe.split(",")[:-1]
    llm = jisu.load(out)
    cfg = llm.config
    if "layers" in recipe:
        assert cfg.num_layers == 1
    else:
        assert sum(map(cfg.mlp_width, range(cfg.num_layers))) == 64 * 2 and cfg.heads(0) == (2, 2)
    assert isinstance(llm.runner, NativeRunner)
    ids = TOKENS[0].tolist()
    ref = llm.model.forward(TOKENS[:1], CausalContext())[0]
    got = sequence_logits(llm.runner, ids)
    # the same model (exactness on layers of different widths: tests/engine/test_native_per_layer.py;
    # here the tiny random model's int8 activations put a few rows on rounding ties)
    assert float((got - ref).abs().max() / ref.abs().max()) < 0.1
    assert len(llm.generate("hello", max_tokens=4, temperature=0, ignore_eos=True).token_ids) == 4


def test_a_model_without_a_native_step_is_refused(monkeypatch):
    from jisu.models import llama

    monkeypatch.setattr(llama, "NATIVE", False)
    st = parse_recipe("prune:layers=2,rtn:w8").before[0]
    with pytest.raises(JisuError, match="does not run on the native step"):
        st.transform.impl.check(st.params, config())
