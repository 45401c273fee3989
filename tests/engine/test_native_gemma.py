"""The native forward step on Gemma 2 and Gemma 3 (tests/fixtures.py's tiny random models: sliding
windows shorter than the prompts, attention and final soft-capping, Gemma 3's local RoPE base and
q/k norms) against the PyTorch reference model, through the paged cache (fp32 and fp16) and the
Engine; batch invariance; the Llama-family configs it runs too; and what stays on the reference."""
from __future__ import annotations

import pytest
import torch

import jisu
from jisu.config import SamplingParams
from jisu.engine.engine import Engine
from jisu.engine.kv_cache import PagedKVCache, SeqBlocks
from jisu.engine.native_runner import NativeRunner, supported
from jisu.engine.runner import TorchRunner, make_runner, sequence_logits
from jisu.models import build_model
from tests.kernels.helpers import FORMATS, ISAS, isa, needs_native, paged_step

from .test_native_runner import RTOL, check_incremental, full_logits, hf_case, pair, prompt, quantized, rel_err

pytestmark = [needs_native, pytest.mark.usefixtures("one_torch_thread")]

GEMMAS = ["gemma2", "gemma3", "gemma3_pattern"]


def prompts(vocab, *lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


# --------------------------------------------------------------------------- selection
@pytest.mark.parametrize("name", GEMMAS + ["qwen2", "qwen3", "mistral"])
def test_runs_natively(name, tmp_path_factory):
    cfg, w, _, _ = hf_case(name, tmp_path_factory)
    model = build_model(cfg, dict(w))
    assert supported(model) is None
    assert isinstance(make_runner(model), NativeRunner)
    assert isinstance(make_runner(model, native=False), TorchRunner)


def test_gemma_config_details(tmp_path_factory):
    """What the Gemma fixtures exercise: windows shorter than the prompts, both soft-caps, a local
    RoPE base, q/k norms; and the +1 of Gemma's norms folded into the weights the step reads."""
    g2, w2, _, _ = hf_case("gemma2", tmp_path_factory)
    g3, _, _, _ = hf_case("gemma3", tmp_path_factory)
    assert g2.attn_softcap and g2.final_softcap and g2.sliding_window < 20 and not g2.qk_norm
    assert g3.qk_norm and g3.rope_local_theta and g3.sliding_window < 20
    assert g2.query_pre_attn_scalar != g2.head_dim and g2.embed_scale == g2.hidden_size ** 0.5
    model = build_model(g2, dict(w2))
    name = "model.layers.0.post_feedforward_layernorm.weight"
    assert torch.equal(model.w[name], w2[name] + 1.0)
    nat = NativeRunner(model)
    assert torch.equal(model.w[name], w2[name] + 1.0)  # not folded twice
    assert nat.handle is not None


def test_not_native_reasons(tmp_path_factory):
    """A model whose weights lack what its architecture's step reads stays on the reference path
    (here a Gemma built over Llama-shaped weights); layers of different widths run natively
    (tests/engine/test_native_per_layer.py)."""
    cfg, w, _, _ = hf_case("gemma2", tmp_path_factory)
    partial = {k: v for k, v in w.items() if "pre_feedforward_layernorm" not in k}
    why = supported(build_model(cfg, partial))
    assert why and "pre_feedforward_layernorm" in why
    assert isinstance(make_runner(build_model(cfg, partial)), TorchRunner)


# --------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("fmt", ["fp32", "q4_1"])
@pytest.mark.parametrize("name", GEMMAS)
def test_matches_reference(name, fmt, tmp_path_factory):
    """Whole prompt, prefill chunks and single tokens through a paged fp32 cache (blocks of 4, a
    20-token prompt: past every sliding window); packed weights against the reference running them."""
    cfg, w, vocab, _ = hf_case(name, tmp_path_factory)
    if fmt != "fp32":
        w = quantized(w, FORMATS[fmt])
    ref, nat = pair(cfg, w)
    check_incremental(ref, nat, prompt(vocab=vocab))


def _batch(runner, cfg, ps, dtype):
    """Prompts prefilled together (the last one in two chunks) then one decode token each."""
    kv = PagedKVCache(cfg, num_blocks=48, block_size=4, dtype=dtype)
    seqs = [SeqBlocks() for _ in ps]
    out1 = paged_step(runner, kv, seqs, [ps[0], ps[1], ps[2][:9]])
    out2 = paged_step(runner, kv, seqs, [[7], [8], ps[2][9:]])
    return torch.cat([out1, out2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", GEMMAS)
def test_paged_batch_matches_reference_paged(name, dtype, tmp_path_factory):
    """A mixed batch through the native step and through the reference model's paged attention
    (TorchRunner), on the same cache dtype: fp16 rounds K/V alike on both sides."""
    cfg, w, vocab, _ = hf_case(name, tmp_path_factory)
    ref, nat = pair(cfg, w)
    ps = prompts(vocab, 5, 17, 23, seed=3)
    got = _batch(nat, cfg, ps, dtype)
    want = _batch(TorchRunner(ref), cfg, ps, dtype)
    assert rel_err(got, want) <= (RTOL if dtype == torch.float32 else 2e-3)
    if dtype == torch.float32:  # and the cache-free whole-sequence forward
        full = full_logits(ref, torch.tensor([ps[1] + [8]]))[0]
        assert rel_err(torch.cat([got[5:22], got[32:33]]), full) <= RTOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_batch_invariance(name, dtype, tmp_path_factory):
    """Greedy decoding of 3 sequences batched one paged step per token: every step's logits are
    bitwise those of the sequence decoded alone (a one-block cache)."""
    cfg, w, vocab, _ = hf_case(name, tmp_path_factory)
    _, nat = pair(cfg, w)
    ps = prompts(vocab, 3, 11, 8, seed=5)
    steps = 10
    alone = []
    for p in ps:
        kv1, s1 = PagedKVCache(cfg, 1, len(p) + steps, dtype=dtype), SeqBlocks()
        logits = paged_step(nat, kv1, [s1], [p], rows=[len(p) - 1])[0]
        seq = [logits]
        for _ in range(steps - 1):
            logits = paged_step(nat, kv1, [s1], [[int(logits.argmax())]])[0]
            seq.append(logits)
        alone.append(seq)
    kv = PagedKVCache(cfg, num_blocks=64, block_size=4, dtype=dtype)
    seqs = [SeqBlocks() for _ in ps]
    ends = torch.tensor([len(p) for p in ps]).cumsum(0) - 1
    out = paged_step(nat, kv, seqs, ps, ends.tolist())
    for step in range(steps):
        for i in range(3):
            assert torch.equal(out[i], alone[i][step]), (name, step, i)
        if step + 1 < steps:
            out = paged_step(nat, kv, seqs, [[int(o.argmax())] for o in out])


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_every_isa(name, tmp_path_factory):
    """The GeLU gate and the soft-capped attention on each ISA: AVX2 and AVX-512 give the same
    bits, and each agrees with the reference."""
    cfg, w, vocab, _ = hf_case(name, tmp_path_factory)
    ref, nat = pair(cfg, w)
    ps = prompts(vocab, 5, 17, 23, seed=4)
    want = _batch(TorchRunner(ref), cfg, ps, torch.float32)
    got = {}
    for n in ISAS:
        with isa(n):
            got[n] = _batch(nat, cfg, ps, torch.float32)
        assert rel_err(got[n], want) <= RTOL, n
    if "avx512" in got and "avx2" in got:
        assert torch.equal(got["avx512"], got["avx2"])


# --------------------------------------------------------------------------- the engine
@pytest.mark.parametrize("kv_dtype", ["f32", "f16"])
@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_engine_native_equals_reference(name, kv_dtype, tmp_path_factory):
    """jisu.load's native step against the reference model through the Engine (paged cache in
    blocks of 4, chunked prefill): the same greedy tokens, prompt log-probabilities close."""
    _, _, vocab, folder = hf_case(name, tmp_path_factory)
    fast, slow = jisu.load(folder), jisu.load(folder, native=False)
    assert isinstance(fast.runner, NativeRunner) and isinstance(slow.runner, TorchRunner)
    ps = prompts(vocab, 9, 21, 4, seed=6)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs = []
    for llm in (fast, slow):
        engine = Engine.from_llm(llm, num_blocks=64, block_size=4, max_step_tokens=16, kv_dtype=kv_dtype)
        outs.append(engine.generate(ps, params, prompt_logprobs=0))
    tol = 1e-4 if kv_dtype == "f32" else 2e-3
    for a, b in zip(*outs):
        assert a["token_ids"] == b["token_ids"]
        for x, y in zip(a["prompt_logprobs"][1:], b["prompt_logprobs"][1:]):
            assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=tol)


@pytest.mark.parametrize("name", ["gemma2_gguf", "gemma3"])
def test_gguf_runs_natively(name, tmp_path):
    """A Gemma GGUF as llama.cpp's converter writes it (norms stored as 1 + w): jisu.load runs it
    natively, with the logits of the reference model over the same file."""
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    from tests.fixtures import CASES, VOCAB_SIZE, build_hf_model, write_gguf

    path = str(tmp_path / f"{name}.gguf")
    write_gguf(build_hf_model(CASES[name], seed=1), CASES[name], path)
    fast, slow = jisu.load(path), jisu.load(path, native=False)
    assert isinstance(fast.runner, NativeRunner) and isinstance(slow.runner, TorchRunner)
    tokens = prompt(vocab=VOCAB_SIZE)
    got = sequence_logits(fast.runner, tokens[0].tolist(), kv_dtype=torch.float32, chunk=7)
    assert rel_err(got, full_logits(slow.model, tokens)[0]) <= RTOL
