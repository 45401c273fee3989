"""The report card: JSON/Markdown, writing into an artifact's manifest.json, the manifest's source as
the default reference, and the quality-vs-speed plot."""
from __future__ import annotations

import json
import os

import pytest

from jisu.eval import report, runner
from jisu.eval.bench import plot_points


def test_card_json_and_markdown():
    card = report.ReportCard(model="m", quality={"perplexity": 12.5, "tokens_scored": 10, "text": "t",
                                                  "kld": {"mean": 0.01, "median": 0.005, "p99": 0.1, "max": 0.3},
                                                  "reference": "r", "delta_perplexity": 0.2, "top1_agreement": 0.9},
                             size={"file_bytes": 1000, "weight_bytes_per_token": 500})
    d = json.loads(card.to_json())
    assert set(d) == {"model", "quality", "speed", "size", "updated"}
    assert report.ReportCard.from_dict(d) == card
    md = card.to_markdown()
    assert "| perplexity | 12.5000" in md and "top-1 agreement | 90.00 %" in md and "file size" in md


def test_write_into_manifest_keeps_other_keys(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "q4", "source": {"path": "x.gguf"}}))
    card = report.ReportCard(model="a", size={"file_bytes": 1, "weight_bytes_per_token": 1})
    report.write_report_card(str(tmp_path), card)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == "q4" and manifest["report_card"]["size"]["file_bytes"] == 1
    report.update_artifact_card(str(tmp_path), quality={"perplexity": 3.0})
    card2 = report.read_report_card(str(tmp_path))
    assert card2.quality == {"perplexity": 3.0} and card2.size == card.size
    assert report.update_artifact_card(str(tmp_path / "nope")) is None
    with pytest.raises(report.JisuError, match="no manifest.json"):
        report.write_report_card(str(tmp_path / "nope"), card)


def test_manifest_source_hook(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"source": {"path": "/models/src.gguf"}}))
    assert runner.manifest_source(str(tmp_path)) == "/models/src.gguf"
    (tmp_path / "src.gguf").write_bytes(b"GGUF")
    (tmp_path / "manifest.json").write_text(json.dumps({"source": {"path": "src.gguf"}}))
    assert runner.manifest_source(str(tmp_path)) == str(tmp_path / "src.gguf")  # relative to the artifact
    (tmp_path / "manifest.json").write_text("[1, 2]")
    assert runner.manifest_source(str(tmp_path)) is None
    assert runner.manifest_source(str(tmp_path / "nope")) is None


def test_eval_artifact_defaults_to_its_source(tmp_path, tiny_hf, capsys):
    import jisu
    from jisu import cli
    from jisu.io.artifact import verify_artifact

    art = str(tmp_path / "art")
    jisu.compress.compress(tiny_hf, art, "rtn:w8", samples=8, seq_len=64, evaluate=False, progress=False)
    assert runner.manifest_source(art) == os.path.abspath(tiny_hf)
    assert cli.main(["eval", art, "--chunks", "2", "--ctx", "32", "--no-cache"]) == 0
    assert "report card written" in capsys.readouterr().err
    card = json.loads((tmp_path / "art" / "manifest.json").read_text())["report_card"]
    q = card["quality"]
    assert q["reference_path"] == os.path.abspath(tiny_hf) and 0 < q["kld"]["mean"] < 0.1
    verify_artifact(art)  # the artifact's files are untouched; it still loads
    jisu.load(art)


def test_plot_is_a_png(tmp_path):
    path = tmp_path / "plot.png"
    report.plot_quality_speed([{"label": "a", "x": 10.0, "y": 0.1}, {"label": "b", "x": 30.0, "y": 0.3}],
                              str(path), ylabel="KLD")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    import matplotlib.image

    assert matplotlib.image.imread(str(path)).shape[2] in (3, 4)


def test_plot_points_prefer_kld_when_given():
    def bench(quality=None):
        engine = {"decode_tok_s": 5.0, "perplexity": 20.0, "weight_format": "float32"}
        return {"model": "m", "quality": quality, "engines": {"jisu": engine, "llama.cpp": dict(engine),
                                                              "transformers": {"skipped": "x"}}}
    points, ylabel, left = plot_points([bench()])
    assert len(points) == 2 and "perplexity" in ylabel and not left
    points, ylabel, left = plot_points([bench({"kld": {"mean": 0.02}})])
    assert [p["y"] for p in points] == [0.02] and "KL" in ylabel and len(left) == 1


def test_plot_adds_a_perplexity_panel_for_the_peers(tmp_path):
    from jisu.eval.bench import perplexity_points, plot

    engine = {"decode_tok_s": 5.0, "perplexity": 20.0, "weight_format": "float32"}
    b = {"model": "m", "quality": {"kld": {"mean": 0.02}}, "machine": {"cpu": "cpu"}, "settings": {"threads": 2},
         "engines": {"jisu": engine, "llama.cpp": dict(engine, decode_tok_s=7.0, perplexity=21.0)}}
    assert [(p["x"], p["y"]) for p in perplexity_points([b])] == [(5.0, 20.0), (7.0, 21.0)]
    one = plot([dict(b, engines={"jisu": engine})], str(tmp_path / "one.png"))
    two = plot([b], str(tmp_path / "two.png"))
    import matplotlib.image

    w1, w2 = matplotlib.image.imread(one).shape[1], matplotlib.image.imread(two).shape[1]
    assert w2 > 1.5 * w1  # a second panel beside the KLD one
