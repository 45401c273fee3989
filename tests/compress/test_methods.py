"""The quantizers as pure functions: RTN error bounds per format, GPTQ and AWQ below RTN on layers
whose inputs have structure (correlated channels, outlier channels), bit packing round trips."""
from __future__ import annotations

import pytest
import torch

from jisu.compress import awq, codebook, gptq, rtn
from jisu.compress.recipe import parse_recipe
from jisu.io.artifact_codec import encode, pack_bits, unpack_bits
from jisu.kernels.formats import NF4_TABLE


def spec(name):
    return parse_recipe("rtn:" + name).quant.fmt


def layer(seed=0, N=96, K=256, n=2048, outliers=0):
    """A weight and calibration inputs with correlated channels (and optional outlier channels)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K ** 0.5
    X = torch.randn(n, K, generator=g) @ mix + 0.2 * torch.randn(n, K, generator=g)
    if outliers:
        X[:, torch.randperm(K, generator=g)[:outliers]] *= 30.0
    W = torch.randn(N, K, generator=g) * 0.05
    return W, X


def out_err(X, W, W_hat):
    return float(((X @ W.T - X @ W_hat.T) ** 2).sum())


@pytest.mark.parametrize("name", ["w4g32", "w4g32a", "w3g32", "w3g64a", "w2g64", "w2g32a"])
def test_rtn_error_at_most_half_a_step(name):
    W, _ = layer()
    W[0, :128] = 0.0  # all-zero groups
    f = rtn.quantize(W, spec(name))
    err = (W - f.dequantize()).abs()
    s = f.scale.abs().repeat_interleave(f.group_size, 1)
    if f.asym:  # min/max cover the group: half a step everywhere (float16 rounding of min/scale aside)
        assert (err <= s / 2 * (1 + 1e-3) + 1e-6).all()
    else:       # Q4_0 convention: codes -2^(b-1) .. 2^(b-1)-1, the top code clamps values of the far sign
        top = (f.q.long() == (1 << f.bits) - 1)
        assert (err[~top] <= s[~top] / 2 * (1 + 1e-3) + 1e-6).all()
        assert (err <= s * (1 + 1e-3) + 1e-6).all()
    assert err[0, :128].max() == 0


@pytest.mark.parametrize("name", ["w8", "w8g32"])
def test_int8_error_at_most_half_a_step(name):
    W, _ = layer()
    f = rtn.quantize(W, spec(name))
    s = f.scale[:, None] if f.group_size is None else f.scale.repeat_interleave(f.group_size, 1)
    assert ((W - f.dequantize()).abs() <= s / 2 * (1 + 1e-3) + 1e-7).all()


def test_codebook_error_at_most_half_the_widest_gap():
    W, _ = layer()
    f = rtn.quantize(W, spec("nf4g64"))
    s = f.scale.repeat_interleave(64, 1)
    half_gap = (NF4_TABLE[1:] - NF4_TABLE[:-1]).max() / 2
    assert ((W - f.dequantize()).abs() <= s * half_gap * (1 + 1e-4) + 1e-7).all()
    f = rtn.quantize(W, spec("kmeansg64"))
    x = W / f.scale.repeat_interleave(64, 1)
    cb = f.codebook.sort(dim=1).values
    bound = torch.maximum(((cb[:, 1:] - cb[:, :-1]) / 2).amax(1), torch.maximum(cb[:, 0] - x.amin(1), x.amax(1) - cb[:, -1]))
    assert ((x - f.dequantize() / f.scale.repeat_interleave(64, 1)).abs() <= bound[:, None] + 1e-5).all()


@pytest.mark.parametrize("name", ["w4g32", "w3g32", "w2g64", "w4g32a", "w3g64a", "w2g32a"])
def test_gptq_below_rtn(name):
    W, X = layer(seed=1)
    H = gptq.hessian_from(X)
    e_rtn = out_err(X, W, rtn.quantize(W, spec(name)).dequantize())
    for act_order in (False, True):
        f, losses = gptq.gptq_quantize(W, H, spec(name), act_order=act_order)
        e = out_err(X, W, f.dequantize())
        assert e < 0.8 * e_rtn, (act_order, e, e_rtn)
        assert type(f) is type(rtn.quantize(W, spec(name)))


@pytest.mark.parametrize("name", ["w8", "nf4g64", "kmeansg64"])
def test_gptq_below_rtn_other_formats(name):
    W, X = layer(seed=2)
    H = gptq.hessian_from(X)
    e_rtn = out_err(X, W, rtn.quantize(W, spec(name)).dequantize())
    f, _ = gptq.gptq_quantize(W, H, spec(name))
    assert out_err(X, W, f.dequantize()) < e_rtn


def test_gptq_layer_error_matches_activations():
    W, X = layer(seed=3, n=512)
    f, _ = gptq.gptq_quantize(W, gptq.hessian_from(X), spec("w4g32"))
    direct = out_err(X, W, f.dequantize())
    via_h = float(gptq.layer_error(W, f.dequantize(), gptq.hessian_from(X)).sum()) * X.shape[0] / 2
    assert via_h == pytest.approx(direct, rel=1e-3)


@pytest.mark.parametrize("name", ["w4g64", "w3g32", "w4g32a"])
def test_awq_below_rtn_with_outlier_channels(name):
    W, X = layer(seed=4, outliers=6)
    H = gptq.hessian_from(X)
    stat, n = awq.act_scale_stat(X)
    s, alpha, errors = awq.search_scale([W], H, stat / n, spec(name))
    q = rtn.quantize(W * s[None, :], spec(name)).dequantize() / s[None, :]   # what the folded model computes
    e_awq, e_rtn = out_err(X, W, q), out_err(X, W, rtn.quantize(W, spec(name)).dequantize())
    assert alpha > 0 and e_awq < 0.9 * e_rtn
    assert errors[0.0] == max(errors[0.0], errors[alpha])


def test_awq_fold_is_exact_before_quantization():
    """x/s through W diag(s) equals x through W: the identity AWQ's folding relies on."""
    W, X = layer(seed=5, n=64, outliers=3)
    s = awq.candidate_scales(X.abs().mean(0), 0.5)
    torch.testing.assert_close((X / s) @ (W * s).T, X @ W.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_bits_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (5, 96), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (5, 96 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, 96), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_bits_in_row_slices_equals_one_pass(bits, monkeypatch):
    """Large matrices are packed a slice of rows at a time (bounded temporaries); a slice size
    that does not divide the rows gives the same bytes."""
    from jisu.io import artifact_codec as artifact

    g = torch.Generator().manual_seed(10 + bits)
    codes = torch.randint(0, 1 << bits, (37, 64), generator=g, dtype=torch.uint8)
    whole = pack_bits(codes, bits)
    monkeypatch.setattr(artifact, "PACK_ROWS_ELEMS", 5 * 64)
    assert torch.equal(pack_bits(codes, bits), whole)


@pytest.mark.parametrize("name", ["w4g32", "w4g32a", "w3g32", "w2g64", "w8", "w8g32", "nf4g64", "kmeansg64", "kmeans"])
def test_stored_bits_per_weight_match_the_formula(name):
    W = torch.randn(48, 128)
    _, entry = encode("w", rtn.quantize(W, spec(name)))
    assert entry["bits_per_weight"] == pytest.approx(spec(name).bits_per_weight(128))


def test_mixed_allocation_upgrades_the_most_sensitive_and_avoids_2_bits():
    from jisu.compress import mixed
    from jisu.errors import JisuError

    def item(name, sens3, sens4):
        n = 1000
        return mixed.Item(name, n, {2: 2.5 * n, 3: 3.5 * n, 4: 4.5 * n, 8: 8.5 * n},
                          {2: 100.0, 3: sens3, 4: sens4, 8: 0.0})

    items = [item("a", 1.0, 0.9), item("b", 10.0, 1.0), item("c", 2.0, 1.5)]
    # budget for all three at 3 bits plus one upgrade to 4: never 2 bits, and "b" (largest drop) upgraded
    choice = mixed.allocate(items, 3 * 3500 + 1000)
    assert choice == {"a": 3, "b": 4, "c": 3}
    # the size of uniform 4-bit: starts from 3 bits; a linear that gains nothing from a 4th bit stays
    items[0] = item("a", 0.9, 0.9)
    assert mixed.allocate(items, 3 * 4500) == {"a": 3, "b": 4, "c": 4}
    # between 2 and 3 bits: starts at 2 and upgrades
    choice = mixed.allocate(items, 3 * 2500 + 1000)
    assert sorted(choice.values()) == [2, 2, 3] and choice["a"] == 3  # the largest drop from 2 bits
    with pytest.raises(JisuError, match="below the smallest"):
        mixed.allocate(items, 3 * 2000)


def test_mixed_allocation_with_choices_per_linear():
    """A width missing from one linear's costs (a group size that does not divide its inputs) is
    never chosen for it, and the others still trade bits with it."""
    from jisu.compress import mixed

    n = 1000
    g128 = mixed.Item("down", n, {4.125: 4.125 * n, 4.25: 4.25 * n, 4.5: 4.5 * n}, {4.125: 3.0, 4.25: 2.9, 4.5: 2.8})
    q = mixed.Item("q", n, {4.25: 4.25 * n, 4.5: 4.5 * n}, {4.25: 10.0, 4.5: 5.0})
    # uniform g64's size: "down" gives up an eighth of a bit so that "q" can take group 32
    budget = 2 * 4.25 * n + 0.125 * n
    assert mixed.allocate([g128, q], budget) == {"down": 4.125, "q": 4.5}
    # no room: both at their narrowest wide width
    assert mixed.allocate([g128, q], 4.125 * n + 4.25 * n) == {"down": 4.125, "q": 4.25}


def test_dequant_linear_in_row_blocks_matches_whole(monkeypatch):
    """The Fisher pass runs a large packed matrix (an LM head) a block of rows at a time, forward
    and backward; the result is the whole matrix's up to float summation order."""
    from jisu.compress import observe as fw
    from jisu.kernels.formats import Int8Weight
    from jisu.kernels.packed import pack

    g = torch.Generator().manual_seed(7)
    p = pack(Int8Weight.quantize_rtn(torch.randn(501, 64, generator=g), 32))
    x = torch.randn(2, 5, 64, generator=g, requires_grad=True)
    gy = torch.randn(2, 5, 501, generator=g)

    def run():
        x.grad = None
        y = fw._DequantLinear.apply(x, p)
        y.backward(gy)
        return y.detach(), x.grad.clone()

    y0, g0 = run()
    monkeypatch.setattr(fw, "BLOCK_ELEMS", 64 * 8 * 5)  # 40 rows a block: 13 blocks
    y1, g1 = run()
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y0, x.detach() @ p.dequantize().T, rtol=1e-5, atol=1e-5)


def test_fisher_layer_by_layer_equals_one_backward_pass(tiny_hf):
    """mixed.fisher backpropagates a layer at a time (each layer recomputed from its stored input);
    the squared output gradients are those of one backward pass through the whole model."""
    from jisu.compress import mixed
    from jisu.compress.observe import CTX, ReferenceNumerics, compression_model, model_form
    from jisu.io.sources import load_weights, resolve
    from jisu.models.layers import linear_names

    cfg, weights, _ = load_weights(resolve(tiny_hf), packed=False)
    runner = compression_model(cfg, model_form(cfg, weights), ReferenceNumerics(exact=True))
    names = linear_names(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 24), generator=torch.Generator().manual_seed(3))
    got = mixed.fisher(runner, ids, names, batch=2)

    want = {n: torch.zeros(runner.w[n].shape[0], dtype=torch.float64) for n in names}
    outs = {}
    runner.numerics.on_output = lambda name, y: outs.__setitem__(name, y) if name in want else None
    for b0 in range(0, 3, 2):
        tok = ids[b0:b0 + 2]
        outs.clear()
        x = runner.embed(tok).requires_grad_(True)
        for i in range(cfg.num_layers):
            x = runner.layer(i, x, CTX)
        logits = runner.head(runner.final_hidden(x))[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tok[:, 1:].reshape(-1),
                                                 reduction="sum")
        grads = torch.autograd.grad(loss, [outs[n] for n in names])
        for n, g in zip(names, grads):
            want[n] += (g.double() ** 2).reshape(-1, g.shape[-1]).sum(0)
    runner.numerics.on_output = None
    count = 3 * 23
    assert set(got) == set(names)
    for n in names:
        torch.testing.assert_close(got[n], want[n] / count, rtol=1e-4, atol=1e-12)


def test_transposed_float_of_a_packed_head_in_blocks(monkeypatch):
    """The LM head's transposed float32 copy for GPTQ is filled a block of rows at a time."""
    from jisu.compress import observe as fw
    from jisu.compress.pipeline import _transposed_float
    from jisu.kernels.formats import Int8Weight
    from jisu.kernels.packed import pack

    w = torch.randn(203, 64, generator=torch.Generator().manual_seed(5))
    p = pack(Int8Weight.quantize_rtn(w, 32))
    monkeypatch.setattr(fw, "BLOCK_ELEMS", 64 * 8 * 3)  # 24 rows a block
    wt = _transposed_float(p)
    assert wt.shape == (64, 203) and wt.is_contiguous()
    assert torch.equal(wt, p.dequantize().T)
    assert torch.equal(_transposed_float(w), w.T)
