"""jisu bench on a tiny model: the JSON keys documented in docs/report_card.md, the Markdown table,
the plot, and peers measured (or skipped with a reason). No timing assertions."""
from __future__ import annotations

import json

import pytest

from jisu.eval import speed
from jisu.eval.peers import unavailable

ENGINE_KEYS = {"engine", "engine_version", "threads", "load_s", "prefill_tok_s", "decode_tok_s",
               "decode_prompt_tokens", "decode_tokens", "ttft_ms", "tpot_ms", "reps", "peak_rss_bytes",
               "weight_bytes_per_token", "weight_format", "perplexity", "perplexity_tokens", "file_bytes",
               "achieved_gb_s"}


@pytest.fixture(scope="module")
def bench_run(tiny_gguf, tmp_path_factory):
    from jisu import cli

    out = tmp_path_factory.mktemp("bench")
    args = ["bench", tiny_gguf, "--against", "llama.cpp,transformers", "--threads", "1", "--reps", "1",
            "--prompt-lengths", "8,16", "--decode-tokens", "2,5", "--decode-prompt", "8",
            "--ppl-chunks", "1", "--ppl-ctx", "32", "--json", str(out / "b.json"), "--plot", str(out / "b.png")]
    return cli.main(args), out


def test_bench_json_keys(bench_run, tiny_gguf, capsys):
    rc, out = bench_run
    assert rc == 0
    b = json.loads((out / "b.json").read_text())
    assert set(b) >= {"schema", "model", "model_path", "model_kind", "file_bytes", "created", "machine",
                      "settings", "engines", "ratios", "notes"}
    assert b["schema"] == "jisu.bench/1" and b["model_kind"] == "gguf"
    jisu = b["engines"]["jisu"]
    assert set(jisu) >= ENGINE_KEYS
    assert set(jisu["prefill_tok_s"]) == {"8", "16"} and set(jisu["tpot_ms"]) == {"p50", "p99"}
    assert jisu["decode_tokens"] == [2, 5] and jisu["perplexity_tokens"] == 31
    # fp32 weights: everything but the embedding, one embedding row, and the (untied) lm head
    hidden, vocab = 32, 300
    assert jisu["weight_bytes_per_token"] > vocab * hidden * 4 and jisu["weight_format"] == "float32"
    for peer in ("llama.cpp", "transformers"):
        res = b["engines"][peer]
        why = unavailable(peer, "gguf")
        if why:
            assert res == {"skipped": why}
        else:
            assert "error" not in res, res
            assert set(res) >= ENGINE_KEYS - {"weight_format"} and set(b["ratios"][peer]) >= {"decode_tok_s"}
            assert res["perplexity"] == pytest.approx(jisu["perplexity"], rel=1e-3)  # same model, same tokens


def test_bench_plot_is_a_png(bench_run):
    _, out = bench_run
    assert (out / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bytes_per_token_counts_stored_bytes():
    sizes = {"emb": 100 * 8, "a": 40, "b": 24}
    assert speed.bytes_per_token(sizes, "emb", 100, "head") == 40 + 24 + 8 + 800  # tied head: whole embedding
    assert speed.bytes_per_token(sizes | {"head": 50}, "emb", 100, "head") == 40 + 24 + 8 + 50

    class Packed:
        nbytes = 123
    assert speed.storage_nbytes(Packed()) == 123


def test_percentile():
    assert speed.percentile([3, 1, 2], 50) == 2
    assert speed.percentile([0, 10], 99) == pytest.approx(9.9)


def test_bad_bench_options_one_line(tiny_gguf, capsys):
    from jisu import cli

    for args, needle in ((["--against", "vllm"], "unknown peer"), (["--reps", "0"], "--reps"),
                         (["--decode-tokens", "9,3"], "--decode-tokens"), (["--quality", "/nope.json"], "no such"),
                         (["--plot", "/no/such/dir/p.png"], "does not exist")):
        assert cli.main(["bench", tiny_gguf, *args]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1
