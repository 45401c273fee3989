"""`jisu export --format gguf`: grids equal gguf-py's dequantization exactly, the file holds the
exported (GPTQ-compensated or artifact) weights exactly, llama.cpp loads it without warnings and
agrees with jisu, the tokenizer matches, and bad input fails in one line before any work."""
import os

import numpy as np
import pytest
import torch

from jisu.export import ExportOptions, export_gguf, grids, run
from jisu.export.quantize import gptq_on_grid, rtn
from jisu.models.common import unpermute_qk

from .conftest import WIDE

ALL_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M"]


def _llama_cpp():
    from jisu.export.check import import_llama_cpp

    return import_llama_cpp()


def _gguf_weights(path):
    """HF-form float32 weights of an exported GGUF, dequantized by gguf-py (q/k rows un-permuted)."""
    import gguf
    from gguf.quants import dequantize

    r = gguf.GGUFReader(path)
    out = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        a = dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        w = torch.from_numpy(np.array(a, dtype=np.float32))
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            w = unpermute_qk(w, WIDE["num_attention_heads"] if "attn_q" in t.name else WIDE["num_key_value_heads"])
        out[t.name] = (w, t.tensor_type.name)
    return out


@pytest.mark.parametrize("qtype", grids.TYPES)
def test_grid_round_trips_through_gguf_dequantize(qtype):
    import gguf
    from gguf.quants import dequantize

    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 512, generator=g) * 0.05
    w[0, :64] = 0.0              # an all-zero block
    w[1, 100:140] += 0.5         # an outlier run
    w[2] = w[2].abs()            # all positive (K-quant mins clamp at 0)
    for imp in (None, torch.rand(512, generator=g) + 0.05):
        gw = rtn(w, qtype, imp)
        ref = dequantize(gw.pack(), gguf.GGMLQuantizationType[qtype])
        assert np.array_equal(ref, gw.dequantize().numpy())
        lo, hi, _ = gw.grid.lo_hi_off
        assert int(gw.codes.min()) >= lo and int(gw.codes.max()) <= hi


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "Q6_K"])
def test_gptq_on_grid_beats_rtn_on_the_same_grid(qtype):
    from jisu.compress import gptq

    g = torch.Generator().manual_seed(2)
    X = torch.randn(2048, 256, generator=g) @ (torch.randn(256, 256, generator=g) * 0.2 + torch.eye(256))
    w = torch.randn(32, 256, generator=g) * 0.05
    H = gptq.hessian_from(X)
    gw = gptq_on_grid(w, gptq.prepare(H), qtype)
    # on the fixed grid: the codes round-trip through gguf-py
    import gguf
    from gguf.quants import dequantize

    assert np.array_equal(dequantize(gw.pack(), gguf.GGMLQuantizationType[qtype]), gw.dequantize().numpy())
    err_gptq = float(gptq.layer_error(w, gw.dequantize(), H).sum())
    err_rtn = float(gptq.layer_error(w, rtn(w, qtype, torch.diag(H).float()).dequantize(), H).sum())
    assert err_gptq < 0.8 * err_rtn


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_export_holds_the_compensated_weights_exactly(wide_gguf, tmp_path, monkeypatch, qtype):
    captured = {}
    orig = run._weights

    def spy(*a, **k):
        r = orig(*a, **k)
        captured.update(r[1])
        return r

    monkeypatch.setattr(run, "_weights", spy)
    out = str(tmp_path / f"wide.{qtype}.gguf")
    res = export_gguf(wide_gguf, out, ExportOptions(qtype=qtype, recipe="gptq", samples=4, seq_len=32, chunks=1,
                                                    ctx=32, check=False))
    assert os.path.isfile(res.card_path)
    got = _gguf_weights(out)
    from jisu.export.gguf import gguf_name
    from jisu.io.gguf import GGUFFile, gguf_config

    cfg = gguf_config(GGUFFile(wide_gguf))
    types = set()
    for name, w in captured.items():
        g = gguf_name(name, cfg)
        if g is None:
            continue
        arr, t = got[g]
        expect = w.dequantize() if hasattr(w, "dequantize") else w
        assert torch.equal(arr, expect.float()), name
        types.add(t)
    base = {"Q4_K_M": {"Q4_K", "Q6_K"}}.get(qtype, {qtype})
    assert base <= types


def test_artifact_export_is_lossless(wide_gguf, tmp_path):
    from jisu.compress import compress
    from jisu.io.artifact import load_formats

    art = str(tmp_path / "art")
    compress(wide_gguf, art, "gptq:w4g32", samples=4, seq_len=32, progress=False)
    out = str(tmp_path / "art.gguf")
    res = export_gguf(art, out, ExportOptions(chunks=1, ctx=32, check=False))
    assert res.card["type"] == "Q4_0" and not any("rounded" in n for n in res.card["notes"])
    formats, _ = load_formats(art)
    got = _gguf_weights(out)
    assert torch.equal(got["blk.0.attn_q.weight"][0], formats["model.layers.0.self_attn.q_proj.weight"].dequantize())
    assert torch.equal(got["blk.1.ffn_down.weight"][0], formats["model.layers.1.mlp.down_proj.weight"].dequantize())
    assert got["blk.1.ffn_down.weight"][1] == "Q4_0"


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_llama_cpp_loads_without_warnings_and_agrees(wide_gguf, tmp_path, qtype):
    if _llama_cpp() is None:
        pytest.skip("llama-cpp-python is not installed")
    out = str(tmp_path / f"w.{qtype}.gguf")
    card = export_gguf(wide_gguf, out, ExportOptions(qtype=qtype, chunks=2, ctx=64)).card
    lc = card["llama_cpp"]
    assert lc["checked"] and lc["load_warnings"] == []
    # llama.cpp rounds activations to 8 bits in its quantized dot products; jisu's reference does not
    assert lc["vs_jisu_export_weights"]["kld"]["mean"] < 0.01
    assert lc["vs_jisu_export_weights"]["top1_agreement"] >= 0.9


def test_max_kld_refuses_and_leaves_nothing(wide_gguf, tmp_path):
    from jisu.errors import JisuError

    out = str(tmp_path / "bad.gguf")
    with pytest.raises(JisuError, match="max-kld"):
        export_gguf(wide_gguf, out, ExportOptions(qtype="Q4_0", chunks=1, ctx=32, max_kld=1e-12, check=False))
    assert os.listdir(tmp_path) == []


def test_bad_input_is_one_line(wide_gguf, tmp_path, capsys):
    from jisu.cli import main

    out = tmp_path / "x.gguf"
    out.write_bytes(b"")
    assert main(["export", wide_gguf, "-o", str(out), "--type", "Q4_0"]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and err.count("\n") == 1
    assert main(["export", wide_gguf, "-o", str(tmp_path / "y.gguf"), "--type", "Q3_X"]) == 2
    err = capsys.readouterr().err
    assert "--type Q3_X" in err and err.count("\n") == 1
    assert main(["export", wide_gguf, "-o", str(tmp_path / "y.gguf"), "--recipe", "awq"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_unexportable_architecture_is_one_line(tmp_path, capsys):
    from tests.fixtures import CASES, build_hf_model, write_gguf

    case = next(c for c in CASES.values() if c.gguf_arch == "gemma2")
    path = str(tmp_path / "g.gguf")
    write_gguf(build_hf_model(case), case, path)
    from jisu.cli import main

    assert main(["export", path, "-o", str(tmp_path / "o.gguf")]) == 2
    err = capsys.readouterr().err
    assert "cannot be exported" in err and err.count("\n") == 1


def test_hf_folder_exports_and_llama_cpp_agrees(tmp_path):
    from tests.fixtures import write_hf_llama

    src = write_hf_llama(str(tmp_path / "hf"))
    out = str(tmp_path / "hf.Q8_0.gguf")
    card = export_gguf(src, out, ExportOptions(qtype="Q8_0", chunks=1, ctx=32, check=_llama_cpp() is not None)).card
    assert card["type"] == "Q8_0" and os.path.getsize(out) == card["file_bytes"]
    import gguf

    r = gguf.GGUFReader(out)
    assert r.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    if _llama_cpp() is not None:
        lc = card["llama_cpp"]
        assert lc["load_warnings"] == [] and lc["vs_jisu_export_weights"]["kld"]["mean"] < 0.01
