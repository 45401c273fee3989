"""`jisu compress --target`: the chosen recipe meets the target (size within 2 %, KLD at or below,
decode speed at or above), the front and the report are written next to OUT, the search's
scratch folders are gone, and a bad target is a one-line error."""
import json
import os

import pytest

from jisu.compress import CompressConfig
from jisu.export import target

CFG = CompressConfig(samples=4, seq_len=32, eval_chunks=2, eval_ctx=32, threads=1, progress=False)


def test_pareto_and_choose():
    rows = [{"recipe": "a", "bytes": 10, "kld": 0.5, "tok_s": 30.0}, {"recipe": "b", "bytes": 20, "kld": 0.1, "tok_s": 20.0},
            {"recipe": "c", "bytes": 25, "kld": 0.2, "tok_s": 15.0}, {"recipe": "d", "bytes": 40, "kld": 0.01, "tok_s": 8.0}]
    assert [r["recipe"] for r in target.pareto(rows)] == ["a", "b", "d"]
    assert target.choose("kld", 0.15, rows)["recipe"] == "b"
    assert target.choose("speed", 16.0, rows)["recipe"] == "b"
    assert target.choose("size", 24.6e-6, rows)["recipe"] == "c"  # 25 bytes is within 2 % of 24.6
    assert target.choose("kld", 0.001, rows) is None


def test_kld_target_keeps_the_smallest_that_meets_it(wide_gguf, tmp_path):
    out = str(tmp_path / "k")
    report = target.search(wide_gguf, out, "kld=0.01", CFG, candidates=["rtn:w2g32a", "rtn:w4g32", "rtn:w8"])
    rows = {r["recipe"]: r for r in report["candidates"]}
    chosen = rows[report["chosen"]]
    assert chosen["kld"] <= 0.01
    assert all(r["kld"] > 0.01 for r in rows.values() if r["bytes"] < chosen["bytes"])
    assert chosen["folder"] == out and os.path.isfile(os.path.join(out, "manifest.json"))
    with open(out + ".target.json") as f:
        assert json.load(f)["chosen"] == report["chosen"]
    assert os.path.getsize(out + ".target.png") > 0
    assert sorted(os.listdir(tmp_path)) == ["k", "k.target.json", "k.target.png"]


def test_size_target_lands_within_two_percent(wide_gguf, tmp_path):
    out = str(tmp_path / "s")
    cands = target.size_candidates(wide_gguf, str(tmp_path), 0.75e6, CFG, variants=("",), ladder=("gptq:w4g32",))
    assert cands and cands[0].startswith("mixed:bpw=")
    report = target.search(wide_gguf, out, "size=0.75", CFG, candidates=cands[:1], tune=0)
    best = report["candidates"][0]
    assert abs(best["bytes"] - 0.75e6) <= 0.02 * 0.75e6
    assert report["chosen"] == cands[0]


def test_size_target_polishes_the_chosen_with_tuning(wide_gguf, tmp_path):
    """The best candidate is compressed again with +tune: same bytes, its own KLD, and whichever of
    the two measures lower is chosen."""
    out = str(tmp_path / "t")
    cands = target.size_candidates(wide_gguf, str(tmp_path), 0.75e6, CFG, variants=("",), ladder=())
    report = target.search(wide_gguf, out, "size=0.75", CFG, candidates=cands[:1], tune=4)
    rows = report["candidates"]
    assert [r["recipe"] for r in rows] == [cands[0], cands[0] + "+tune=4"]
    assert rows[1]["bytes"] == rows[0]["bytes"]
    assert rows[1]["kld"] != rows[0]["kld"]
    assert report["chosen"] == min(rows, key=lambda r: r["kld"])["recipe"]
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["recipe"]["text"] == report["chosen"]
    assert target._tuned(cands[0] + "+tune=4", 8) is None and target._tuned("rtn:w8", 0) is None


def test_speed_target_measures_decode(wide_gguf, tmp_path):
    out = str(tmp_path / "v")
    report = target.search(wide_gguf, out, "speed=0.5", CFG, candidates=["rtn:w8", "rtn:w4g32"], tune=0)
    assert report["chosen"] == "rtn:w8"  # the first is fast enough: nothing smaller is tried
    assert len(report["candidates"]) == 1 and report["candidates"][0]["tok_s"] >= 0.5


def test_speed_target_prunes_layers_when_no_bit_width_is_fast_enough(wide_gguf, tmp_path, monkeypatch):
    """A speed the ladder does not reach tries depth-pruned recipes next (fewest layers first) and
    keeps the first that meets it; its artifact has fewer layers."""
    assert target.prune_candidates(30) == ["prune:layers=4,gptq:w4g32", "prune:layers=8,gptq:w4g32",
                                           "prune:layers=15,gptq:w4g32"]
    assert target.prune_candidates(2) == ["prune:layers=1,gptq:w4g32"]
    layers = {}

    def speed(folder, threads, tokens=target.SPEED_TOKENS):  # fast only with a layer dropped
        with open(os.path.join(folder, "config.json")) as f:
            n = json.load(f)["num_layers"]
        layers[folder] = n
        return 100.0 if n < max(layers.values()) else 1.0

    monkeypatch.setattr(target, "decode_speed", speed)
    out = str(tmp_path / "p")
    report = target.search(wide_gguf, out, "speed=50", CFG, candidates=["rtn:w8"], tune=0,
                           pruned=["prune:layers=1,rtn:w4g32"])
    assert [r["recipe"] for r in report["candidates"]] == ["rtn:w8", "prune:layers=1,rtn:w4g32"]
    assert report["chosen"] == "prune:layers=1,rtn:w4g32"
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["num_layers"] == max(layers.values()) - 1


def test_unmet_target_writes_nothing(wide_gguf, tmp_path):
    from jisu.errors import JisuError

    with pytest.raises(JisuError, match="no candidate meets it"):
        target.search(wide_gguf, str(tmp_path / "n"), "kld=1e-9", CFG, candidates=["rtn:w2g32a"])
    assert os.listdir(tmp_path) == []


def test_bad_target_is_one_line(wide_gguf, tmp_path, capsys):
    from jisu.cli import main

    assert main(["compress", wide_gguf, "-o", str(tmp_path / "o"), "--target", "bits=4"]) == 2
    err = capsys.readouterr().err
    assert "--target bits=4" in err and err.count("\n") == 1
    assert main(["compress", wide_gguf, "-o", str(tmp_path / "o"), "--target", "size=1", "--recipe", "rtn:w8"]) == 2
    assert "one of them" in capsys.readouterr().err
    assert main(["compress", wide_gguf, "-o", str(tmp_path / "o")]) == 2
    assert os.listdir(tmp_path) == []
