"""`jisu export --format onnx`: onnxruntime's logits equal jisu's reference on the exported weights
(fp32, fp16, int8, int4), KV-cache steps and left-padded batches equal one pass, the MatMulNBits
blocks hold the grid's weights exactly, HF folders of each Llama-family variant agree with
transformers, and bad input fails in one line leaving nothing behind."""
import os

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from jisu.export import OnnxOptions, export_onnx, onnx_export  # noqa: E402
from jisu.io.gguf import GGUFFile, gguf_config  # noqa: E402

OPTS = dict(chunks=2, ctx=48, threads=1)


def _export(src, out, **kw):
    return export_onnx(src, str(out), OnnxOptions(**{**OPTS, **kw}))


@pytest.mark.parametrize("qtype", ["fp32", "fp16", "int8", "int4"])
def test_onnxruntime_matches_jisu_on_the_exported_weights(wide_gguf, tmp_path, qtype):
    card = _export(wide_gguf, tmp_path / qtype, qtype=qtype).card
    rt = card["onnxruntime"]
    assert rt["checked"]
    assert abs(rt["vs_jisu_export_weights"]["kld"]["mean"]) < 1e-5
    assert rt["vs_jisu_export_weights"]["top1_agreement"] == 1.0
    assert rt["kv_cache_max_abs_diff"] < 1e-4
    assert card["type"] == qtype and os.path.isfile(tmp_path / qtype / "model.onnx")
    if qtype == "fp32":
        assert rt["vs_source"]["kld"]["max"] < 1e-6


def test_int4_blocks_hold_the_gptq_weights_exactly(wide_gguf, tmp_path, monkeypatch):
    import onnx
    from onnx import numpy_helper

    captured = {}
    orig = onnx_export._weights

    def spy(*a, **k):
        r = orig(*a, **k)
        captured.update(r[1])
        return r

    monkeypatch.setattr(onnx_export, "_weights", spy)
    out = tmp_path / "g"
    card = _export(wide_gguf, out, qtype="int4", recipe="gptq", samples=4, seq_len=32, check=False).card
    assert card["method"] == "gptq"
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    name = "model.layers.1.mlp.down_proj.weight"
    blob, scales = inits[name + ".qweight"], inits[name + ".scales"]
    codes = np.stack([blob & 15, blob >> 4], axis=-1).reshape(blob.shape[0], -1).astype(np.float32)
    deq = (codes - 8).reshape(scales.shape[0], scales.shape[1], 32) * scales[..., None]
    assert np.array_equal(deq.reshape(blob.shape[0], -1), captured[name].dequantize().numpy())


def test_left_padded_batch_and_cache_steps_equal_one_pass(wide_gguf, tmp_path):
    out = tmp_path / "b"
    _export(wide_gguf, out, qtype="fp32", check=False)
    cfg = gguf_config(GGUFFile(wide_gguf))
    sess = onnx_export.session(str(out / "model.onnx"), 1)
    a, b = [5, 9, 17, 33, 2, 8, 40], [7, 11, 3]
    ref_a, _ = onnx_export.run_onnx(sess, cfg, a)
    ref_b, _ = onnx_export.run_onnx(sess, cfg, b)
    pad = len(a) - len(b)
    feed = {"input_ids": np.array([a, [0] * pad + b], np.int64),
            "attention_mask": np.array([[1] * len(a), [0] * pad + [1] * len(b)], np.int64),
            "position_ids": np.array([list(range(len(a))), [0] * pad + list(range(len(b)))], np.int64)}
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros((2, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
    logits = sess.run(["logits"], feed)[0]
    assert np.allclose(logits[0], ref_a.numpy(), atol=1e-4)
    assert np.allclose(logits[1, pad:], ref_b.numpy(), atol=1e-4)
    # prefill 3 tokens, then one at a time
    step, past = onnx_export.run_onnx(sess, cfg, a[:3])
    rows = [step]
    for j in range(3, len(a)):
        step, past = onnx_export.run_onnx(sess, cfg, [a[j]], past, j)
        rows.append(step)
    assert past["present.0.key"].shape == (1, cfg.num_kv_heads, len(a), cfg.head_dim)
    assert torch.allclose(torch.cat(rows), ref_a, atol=1e-4)


@pytest.mark.parametrize("case_name", ["llama3_rope", "mistral", "qwen2", "qwen3"])
def test_hf_folder_export_agrees_with_transformers(tmp_path, case_name):
    from tests.fixtures import CASES, build_hf_model, save_hf

    case = CASES[case_name]
    model = build_hf_model(case)
    src = str(tmp_path / "hf")
    save_hf(model, src)
    out = tmp_path / "o"
    card = _export(src, out, qtype="fp32", check=False).card
    from jisu.io.hf import hf_config

    cfg = hf_config(src)
    ids = [3, 17, 25, 9, 40, 41, 12, 7, 30, 5]
    sess = onnx_export.session(str(out / "model.onnx"), 1)
    got, _ = onnx_export.run_onnx(sess, cfg, ids)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].float()
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), float((got - want).abs().max())
    assert card["tokenizer_files"]


def test_artifact_export_keeps_its_int4_weights(wide_gguf, tmp_path):
    from jisu.compress import compress

    art = str(tmp_path / "art")
    compress(wide_gguf, art, "gptq:w4g32", samples=4, seq_len=32, progress=False)
    card = _export(art, tmp_path / "o").card
    assert card["type"] == "int4" and not any("rounded" in n for n in card["notes"])
    assert abs(card["onnxruntime"]["vs_jisu_export_weights"]["kld"]["mean"]) < 1e-5


def test_max_kld_refuses_and_leaves_nothing(wide_gguf, tmp_path):
    from jisu.errors import JisuError

    out = tmp_path / "x"
    with pytest.raises(JisuError, match="max-kld"):
        _export(wide_gguf, out, qtype="int4", max_kld=1e-12)
    assert os.listdir(tmp_path) == []


def test_bad_input_is_one_line(wide_gguf, tmp_path, capsys):
    from jisu.cli import main

    assert main(["export", wide_gguf, "--format", "onnx", "-o", str(tmp_path / "o"), "--type", "Q4_0"]) == 2
    err = capsys.readouterr().err
    assert "--type Q4_0" in err and err.count("\n") == 1
    (tmp_path / "f").write_bytes(b"")
    assert main(["export", wide_gguf, "--format", "onnx", "-o", str(tmp_path / "f")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["export", wide_gguf, "--format", "onnx", "-o", str(tmp_path / "o"), "--type", "fp16",
                 "--recipe", "gptq"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_cli_writes_the_folder(wide_gguf, tmp_path, capsys):
    from jisu.cli import main

    out = tmp_path / "cli"
    assert main(["export", wide_gguf, "--format", "onnx", "-o", str(out), "--type", "int8", "--threads", "1"]) == 0
    assert "onnxruntime on held-out text" in capsys.readouterr().out
    assert {"model.onnx", "config.json", "report.json"} <= set(os.listdir(out))


def test_unsupported_architecture_is_one_line(tmp_path, capsys):
    from jisu.cli import main
    from tests.fixtures import CASES, build_hf_model, save_hf

    src = str(tmp_path / "g")
    save_hf(build_hf_model(CASES["gemma2"]), src)
    capsys.readouterr()
    assert main(["export", src, "--format", "onnx", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "gemma2" in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["g"]
