"""jisu eval: the log-prob math, perplexity against a hand computation, KL divergence against itself
and noisy copies, the reference cache, and one-line errors for bad text files."""
from __future__ import annotations

import math

import pytest
import torch

from jisu.api import LLM
from jisu.eval import quality, runner
from jisu.io.text import Text
from jisu.models import build_model
from jisu.models.layers import CausalContext

CHUNKS, CTX = 2, 32


def hand_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    x = logits.double()
    m = x.max(-1, keepdim=True).values
    return x - (m + (x - m).exp().sum(-1, keepdim=True).log())


def noisy_copy(llm, scale: float, seed: int = 0):
    """The same model with scale * (one fixed Gaussian draw per tensor) added to every weight."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, w in llm.model.w.items():
        if name == "lm_head.weight" and w is llm.model.w["model.embed_tokens.weight"]:
            continue
        weights[name] = w + scale * torch.randn(w.shape, generator=g)
    return LLM(build_model(llm.config, weights), llm.tokenizer, llm.source)


def test_math_on_random_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 11, generator=g) * 3
    targets = torch.randint(0, 11, (5, 7), generator=g)
    lp = quality.log_probs(logits)
    expected = math.exp(-hand_log_softmax(logits).gather(-1, targets.unsqueeze(-1)).mean().item())
    assert quality.perplexity(lp, targets) == pytest.approx(expected, rel=1e-6)
    assert torch.equal(quality.kl_divergence(lp, lp), torch.zeros(5, 7, dtype=torch.float64))
    other = quality.log_probs(logits + torch.randn(5, 7, 11, generator=g))
    p, q = hand_log_softmax(logits), hand_log_softmax(other.double())
    assert torch.allclose(quality.kl_divergence(lp, other), (p.exp() * (p - q)).sum(-1), atol=1e-6)
    assert (quality.kl_divergence(lp, other) > 0).all()
    assert quality.top1_agreement(lp, lp) == 1.0
    stats = quality.summarize(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))
    assert stats == {"mean": 2.0, "median": 2.0, "p99": pytest.approx(3.96), "max": 4.0}


def test_kld_against_itself_is_zero(tiny_llm):
    r = runner.evaluate(tiny_llm, tiny_llm, chunks=CHUNKS, ctx=CTX)
    assert r.kld["max"] < 1e-6 and r.kld["mean"] == pytest.approx(0, abs=1e-9)
    assert r.top1_agreement == 1.0
    assert r.delta_perplexity == pytest.approx(0, abs=1e-9)
    assert r.tokens_scored == CHUNKS * (CTX - 1)


def test_kld_grows_with_noise(tiny_llm):
    klds, agreement = [], []
    for scale in (0.0, 0.003, 0.01, 0.03, 0.1):
        r = runner.evaluate(noisy_copy(tiny_llm, scale), tiny_llm, chunks=CHUNKS, ctx=CTX)
        klds.append(r.kld["mean"])
        agreement.append(r.top1_agreement)
    assert klds[0] < 1e-6
    assert all(a < b for a, b in zip(klds, klds[1:])), klds
    assert agreement[-1] < 1.0


def test_perplexity_matches_hand_computation(tiny_llm, tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("The theory of the thing in the hat: " * 40, encoding="utf-8")
    r = runner.evaluate(tiny_llm, text=str(path), chunks=CHUNKS, ctx=CTX)
    ids = tiny_llm.tokenizer.encode(path.read_text())
    nll = []
    for i in range(CHUNKS):
        chunk = ids[i * CTX:(i + 1) * CTX]
        with torch.inference_mode():
            logits = tiny_llm.model.forward(torch.tensor([chunk]), CausalContext())[0]
        lp = hand_log_softmax(logits)
        nll += [-lp[t, chunk[t + 1]].item() for t in range(CTX - 1)]
    assert r.perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-6)
    assert r.kld is None and r.reference is None


def test_reference_cache_reused_and_invalidated(tiny_gguf, tiny_hf, tmp_path, monkeypatch):
    loaded = []
    real_load = runner._load
    monkeypatch.setattr(runner, "_load", lambda m, *a, **k: loaded.append(m) or real_load(m, *a, **k))
    cache = str(tmp_path / "cache")
    first = runner.evaluate(tiny_hf, tiny_gguf, chunks=CHUNKS, ctx=CTX, cache_dir=cache)
    assert first.reference_cache == "miss" and loaded == [tiny_gguf, tiny_hf]
    loaded.clear()
    second = runner.evaluate(tiny_hf, tiny_gguf, chunks=CHUNKS, ctx=CTX, cache_dir=cache)
    assert second.reference_cache == "hit" and loaded == [tiny_hf]  # the reference was not run again
    assert second.kld == first.kld and second.perplexity == first.perplexity
    loaded.clear()
    other = Text("other", "A different text, long enough for two chunks of tokens. " * 20)
    third = runner.evaluate(tiny_hf, tiny_gguf, text=other, chunks=CHUNKS, ctx=CTX, cache_dir=cache)
    assert third.reference_cache == "miss" and loaded == [tiny_gguf, tiny_hf]
    loaded.clear()
    runner.evaluate(tiny_hf, tiny_gguf, chunks=CHUNKS, ctx=CTX, cache_dir=None)  # --no-cache
    assert loaded == [tiny_gguf, tiny_hf]


@pytest.mark.parametrize("content,needle", [
    (None, "no such text file"),
    (b"", "empty"),
    (b"  \n\t\n", "empty"),
    (b"caf\xe9 au lait " * 40, "not UTF-8"),
    (b"too short", "too short for one chunk"),
])
def test_bad_text_files_fail_before_loading(tmp_path, monkeypatch, capsys, tiny_gguf, content, needle):
    from jisu import api, cli

    monkeypatch.setattr(api, "load", lambda *a, **k: pytest.fail("loaded a model for a bad text file"))
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_bytes(content)
    rc = cli.main(["eval", tiny_gguf, "--text", str(path), "--ctx", "64", "--no-cache"])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and str(path) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_text_too_short_in_tokens_is_one_line(tmp_path, capsys, tiny_gguf):
    from jisu import cli

    path = tmp_path / "short.txt"
    path.write_text(" the" * 40)  # 160 bytes but ~40 tokens: needs the tokenizer to notice
    rc = cli.main(["eval", tiny_gguf, "--text", str(path), "--ctx", "64", "--no-cache"])
    err = capsys.readouterr().err
    assert rc == 2 and "too short for one chunk of 64 tokens" in err and len(err.strip().splitlines()) == 1


def test_fewer_chunks_than_asked_is_a_note(tiny_llm):
    text = Text("short", "A short text that fills a few chunks only. " * 4)
    r = runner.evaluate(tiny_llm, text=text, chunks=100, ctx=CTX)
    assert 1 <= r.chunks < 100 and r.notes and "using" in r.notes[0]


def test_reference_runs_on_the_fp32_path(tiny_gguf, monkeypatch):
    import functools

    from jisu import api

    calls = []

    @functools.wraps(api.load)
    def load(model, **kwargs):
        calls.append((model, kwargs))
        return real(model, **kwargs)

    real = api.load
    monkeypatch.setattr(api, "load", load)
    r = runner.evaluate(tiny_gguf, tiny_gguf, chunks=CHUNKS, ctx=CTX, cache_dir=None)
    ref_kwargs, model_kwargs = calls[0][1], calls[1][1]
    assert ref_kwargs.get("packed") is False and ref_kwargs.get("native") is False
    assert "packed" not in model_kwargs  # MODEL runs as jisu.load gives it
    assert r.model_format == "float32" and r.kld["max"] < 1e-4
    runner.evaluate(tiny_gguf, tiny_gguf, chunks=CHUNKS, ctx=CTX, cache_dir=None, fp32=True)
    assert calls[-1][1].get("packed") is False


def test_cli_eval_json(tiny_gguf, tiny_hf, tmp_path, capsys):
    import json

    from jisu import cli

    out = tmp_path / "q.json"
    rc = cli.main(["eval", tiny_hf, "--reference", tiny_gguf, "--chunks", "2", "--ctx", "32",
                   "--cache-dir", str(tmp_path / "c"), "--json", str(out)])
    assert rc == 0
    q = json.loads(out.read_text())
    assert set(q) >= {"model", "model_path", "model_format", "text", "text_sha256", "chunks", "ctx", "tokens_scored", "perplexity",
                      "reference", "reference_perplexity", "delta_perplexity", "kld", "top1_agreement",
                      "reference_cache", "seconds"}
    assert set(q["kld"]) == {"mean", "median", "p99", "max"}
    assert q["kld"]["max"] < 1e-6  # the HF folder and the GGUF hold the same weights
    assert "| perplexity |" in capsys.readouterr().out
