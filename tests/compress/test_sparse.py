"""Unstructured and N:M sparsity steps (jisu.compress.sparse): exact N:M masks, SparseGPT below
magnitude pruning in layer error, Wanda's mask by its definition, zeros kept through GPTQ, and
one-line errors before any work."""
from __future__ import annotations

import importlib
import os
from dataclasses import replace

import pytest
import torch

import jisu
from jisu.compress import gptq, sparse
from jisu.compress.recipe import RecipeError, parse_recipe
from jisu.compress.spec import FormatSpec
from jisu.compress.steps import StepContext, Teacher, transforms
from jisu.errors import JisuError
from jisu.models.layers import linear_names

from .conftest import FAST

W4 = FormatSpec("int", 4, 32)


@pytest.fixture(autouse=True, scope="module")
def _registered():
    """The steps registry loads its modules once; a test that swapped TRANSFORMS for a copy while
    that happened (test_steps' fixture) leaves them unregistered: register them again."""
    if "sparsegpt" not in transforms():
        importlib.reload(sparse)


def _fail(problem):
    return RecipeError(problem)


def sp(text: str) -> sparse.Sparsity:
    return sparse.parse_sparsity(text, _fail)


@pytest.fixture(scope="module")
def tiny(tiny_hf):
    from jisu.io.sources import load_weights, resolve

    cfg, weights, _ = load_weights(resolve(tiny_hf), packed=False)
    ids = torch.randint(0, cfg.vocab_size, (8, 48), generator=torch.Generator().manual_seed(5))
    return cfg, {n: t.float() for n, t in weights.items()}, ids


def run_step(tiny, method: str, pattern: str):
    cfg, weights, ids = tiny
    ctx = StepContext(cfg, dict(weights), Teacher(cfg, weights), ids)
    info = transforms()[method].impl.apply(sp(pattern), ctx)
    return ctx, info


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_masks_have_exactly_n_zeros_per_group(tiny, method, pattern):
    n, m = map(int, pattern.split(":"))
    ctx, info = run_step(tiny, method, pattern)
    cfg, weights, _ = tiny
    for name in linear_names(cfg):
        w = ctx.weights[name]
        assert w is not weights[name] and not torch.equal(w, weights[name])
        zeros = (w == 0).reshape(w.shape[0], -1, m).sum(-1)
        assert torch.all(zeros == n), name
    assert info["zeros"] == pytest.approx(n / m) and info["pattern"] == pattern
    # untouched: the embedding, norms and head; the teacher's weights are not changed in place
    assert ctx.weights["model.embed_tokens.weight"] is weights["model.embed_tokens.weight"]
    assert all(torch.count_nonzero(weights[n]) == weights[n].numel() for n in linear_names(cfg))


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_unstructured_fraction(tiny, method):
    ctx, info = run_step(tiny, method, "50%")
    for name in linear_names(tiny[0]):
        w = ctx.weights[name]
        assert int((w == 0).sum()) == w.numel() // 2, name
    assert info["zeros"] == 0.5


@pytest.mark.parametrize("pattern", ["50%", "2:4", "70%"])
def test_sparsegpt_layer_error_below_magnitude_on_every_linear(tiny, pattern):
    """||W X - W' X||^2 (through H) on every linear, both pruned from the same weights and inputs,
    the calibration walking the model as the step does (earlier linears already pruned)."""
    cfg, weights, ids = tiny
    s = sp(pattern)
    seen = {}

    def prune(name, w, H):
        new, mask = sparse.sparsegpt(w, H, s)
        mag, mmask = sparse.magnitude(w, s)
        assert mask.sum() >= mmask.sum()   # at least as many zeros as the baseline
        seen[name] = (float(gptq.layer_error(w, new, H).sum()), float(gptq.layer_error(w, mag, H).sum()))
        return new

    sparse.walk(cfg, dict(weights), ids, prune)
    assert set(seen) == set(linear_names(cfg))
    for name, (err, mag) in seen.items():
        assert err < mag, (name, err, mag)


@pytest.mark.parametrize("pattern", ["50%", "25%", "2:4", "3:8"])
def test_wanda_mask_is_its_definition(pattern):
    """Wanda prunes the weights of lowest |W_ij| * ||X_j||_2 in each output row (or each group of M
    inputs of a row), ||X_j|| over every calibration token."""
    g = torch.Generator().manual_seed(0)
    N, K = 24, 64
    w = torch.randn(N, K, generator=g)
    X = torch.randn(500, K, generator=g) * torch.rand(K, generator=g) * 3
    s = sp(pattern)
    got, mask = sparse.wanda(w, gptq.hessian_from(X), s)
    score = w.abs() * X.norm(dim=0)
    want = torch.zeros(N, K, dtype=torch.bool)
    for r in range(N):
        if s.nm:
            for c0 in range(0, K, s.m):
                low = score[r, c0:c0 + s.m].argsort()[:s.n]
                want[r, c0 + low] = True
        else:
            want[r, score[r].argsort()[:int(K * s.fraction)]] = True
    assert torch.equal(mask, want)
    assert torch.equal(got, w.masked_fill(want, 0.0))


def test_gptq_with_kept_zeros_stores_zero_codes():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 128, generator=g)
    X = torch.randn(400, 128, generator=g) @ torch.randn(128, 128, generator=g)   # correlated inputs
    H = gptq.hessian_from(X)
    ws, mask = sparse.sparsegpt(w, H, sp("2:4"))
    for spec in (W4, FormatSpec("int", 3, 32), FormatSpec("int", 8, None), FormatSpec("int", 8, 32)):
        fmt, _ = gptq.gptq_quantize(ws, H, spec, zeros=mask)
        deq = fmt.dequantize()
        assert torch.all(deq[mask] == 0), spec.name
        plain, _ = gptq.gptq_quantize(ws, H, spec)
        assert (plain.dequantize()[mask] != 0).any()   # without the mask, GPTQ's updates fill the zeros
    # no mask, or one that marks nothing: the same codes as before the hook existed
    a, _ = gptq.gptq_quantize(w, H, W4)
    b, _ = gptq.gptq_quantize(w, H, W4, zeros=torch.zeros_like(mask))
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)
    with pytest.raises(JisuError, match="no exact zero"):
        gptq.gptq_quantize(ws, H, FormatSpec("int", 4, 32, sym=False), zeros=mask)


@pytest.mark.parametrize("recipe", ["sparsegpt:50%,gptq:w4g32", "wanda:2:4,gptq:w3g32:noact", "sparsegpt:4:8,rtn:w4g32"])
def test_quantized_codes_decode_to_zero_on_the_mask(tiny, recipe):
    from jisu.compress.pipeline import quantize_model

    cfg, weights, ids = tiny
    r = parse_recipe(recipe)
    ctx = StepContext(cfg, dict(weights), Teacher(cfg, weights), ids)
    step = r.before[0]
    step.transform.impl.apply(step.params, ctx)
    masks = {n: ctx.weights[n] == 0 for n in linear_names(cfg)}
    qz = quantize_model(cfg, ctx.weights, r, ids, progress=False)
    for n, mask in masks.items():
        deq = qz.tensors[n].dequantize()
        assert mask.float().mean() >= 0.5 and torch.all(deq[mask] == 0), n


def test_compress_end_to_end_keeps_the_pattern(tiny_hf, tmp_path):
    out = tmp_path / "out"
    r = jisu.compress.compress(tiny_hf, str(out), "sparsegpt:2:4,gptq:w4g32", **FAST)
    (log,) = r.manifest["steps"]
    assert log["step"] == "sparsegpt:2:4" and log["zeros"] == 0.5 and log["layer_error"] > 0
    q = jisu.load(str(out))
    cfg = q.model.cfg
    for n in linear_names(cfg):
        w = q.model.w[n]
        w = w.dequantize() if hasattr(w, "dequantize") else w
        assert torch.all((w == 0).reshape(w.shape[0], -1, 4).sum(-1) >= 2), n
    assert r.manifest["quality"]["kld_mean"] > 0


@pytest.mark.parametrize("text, match", [
    ("sparsegpt:0%,gptq:w4g32", "removes nothing"), ("wanda:100%,rtn:w8", "removes everything"),
    ("sparsegpt:4:4,gptq:w4g32", "0 < N < M"), ("wanda:5:4,rtn:w8", "0 < N < M"), ("wanda:0:4,rtn:w8", "0 < N < M"),
    ("wanda:50,rtn:w8", "give a percentage"), ("wanda:x%,rtn:w8", "not a percentage"),
    ("sparsegpt:50%,gptq:w4g32a", "cannot keep the pruned weights at exactly zero"),
    ("wanda:2:4,rtn:nf4g64", "cannot keep"), ("rtn:w8,wanda:2:4", "cannot run after")])
def test_bad_recipes_are_one_line_errors(text, match):
    with pytest.raises(RecipeError, match=match) as e:
        parse_recipe(text)
    assert "\n" not in str(e.value)


def test_width_and_native_checks_fail_before_any_work(tiny_hf, tiny, tmp_path):
    cfg = tiny[0]
    with pytest.raises(JisuError, match=r"mlp.down_proj.weight has 128 inputs, not a multiple of M=6|"
                                         r"has 64 inputs, not a multiple of M=6"):
        jisu.compress.compress(tiny_hf, str(tmp_path / "out"), "wanda:3:6,gptq:w4g32", **FAST)
    assert os.listdir(tmp_path) == []
    impl = transforms()["sparsegpt"].impl
    with pytest.raises(JisuError, match="native step cannot run this model.*gelu") as e:
        impl.check(sp("50%"), replace(cfg, hidden_act="gelu"))
    assert "\n" not in str(e.value)
    impl.check(sp("2:4"), cfg)   # the tiny model itself is fine
