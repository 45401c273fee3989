"""Streaming compression (jisu.compress.stream): the source's matrices read from the file when
used give the values the loader gives; a streamed run equals one over the loaded model; the
embedding and head are never stored in float32 and the artifact is not larger than its source."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

import jisu
from jisu.compress import pipeline
from jisu.compress.stream import SourceWeight, load_streamed
from jisu.io import text
from jisu.io.artifact_codec import Encoded
from jisu.io.sources import load_weights, resolve
from jisu.models.layers import EMBED, HEAD
from tests.fixtures import TINY, tiny_weights, write_gguf_file

from .conftest import FAST

KQ_CFG = {**TINY, "hidden_size": 256, "intermediate_size": 512}


def write_kquant_gguf(path: str, qtype, monkeypatch) -> str:
    """A Llama GGUF whose every matrix is `qtype`; K-quant blocks are random (finite scales), as
    gguf-py cannot quantize to them."""
    import gguf

    from tests.io.test_gguf_quants import _random_blocks

    rng = np.random.default_rng(0)
    real = gguf.quants.quantize
    if qtype in (T.Q4_K, T.Q6_K):
        monkeypatch.setattr(gguf.quants, "quantize", lambda a, t: _random_blocks(t, a.shape, rng))
    try:
        write_gguf_file(path, "llama", tiny_weights(0, KQ_CFG), {**KQ_CFG, "rms_norm_eps": 1e-5}, chat=True,
                        tensor_type=qtype, permute=True, extra=lambda w: w.add_rope_freq_base(10000.0))
    finally:
        monkeypatch.setattr(gguf.quants, "quantize", real)
    return path


@pytest.fixture(scope="module", params=["hf", "hf_tied", "gguf"])
def any_source(request, tiny_hf, tiny_hf_tied, tiny_gguf):
    return {"hf": tiny_hf, "hf_tied": tiny_hf_tied, "gguf": tiny_gguf}[request.param]


def test_source_weights_match_the_loader(any_source):
    source = resolve(any_source)
    cfg, loaded, _ = load_weights(source)
    cfg2, lazy, _ = load_streamed(source)
    assert cfg2 == cfg and set(lazy) == set(loaded)
    for name, t in loaded.items():
        got = lazy[name]
        if isinstance(got, SourceWeight):
            assert torch.equal(got.dequantize(), t), name
            idx = torch.tensor([[0, t.shape[0] - 1], [3, 1]])
            assert torch.equal(got.rows(idx), t[idx]), name
        else:
            assert torch.equal(got, t), name
    assert isinstance(lazy["model.layers.0.mlp.down_proj.weight"], SourceWeight)


@pytest.mark.parametrize("recipe", ["rtn:w4g32", "gptq:w4g32+embed+head", "awq:w4g32", "gptq:w3g32+head=w8g32"])
def test_streamed_equals_loaded(any_source, recipe, monkeypatch):
    """Row blocks of a few rows: the embedding/head are quantized and looked up in many pieces."""
    monkeypatch.setattr("jisu.compress.stream.ROW_BLOCK_ELEMS", 256)
    source = resolve(any_source)
    cfg, weights, tok = load_weights(source)
    rec = jisu.compress.recipe.parse_recipe(recipe)
    ids = text.calibration_ids(tok, text.read_calibration(None), 4, 32) if rec.needs_calibration else None
    a = pipeline.quantize_model(cfg, weights, rec, ids, progress=False)
    cfg, lazy, _ = load_streamed(source)
    b = pipeline.quantize_model(cfg, lazy, rec, ids, progress=False, encode=True)
    assert set(a.tensors) == set(b.tensors) and a.cfg == b.cfg and a.tied_head == b.tied_head
    for name, x in a.tensors.items():
        y = b.tensors[name]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and torch.equal(x, y), name
            continue
        if name.startswith("model.layers."):
            assert isinstance(y, Encoded), name
            y = y.decode()
        assert type(x) is type(y) and torch.equal(x.dequantize(), y.dequantize()), name


def _check_tables(r, tied: bool, smaller: bool = True):
    m = r.manifest
    e = m["tensors"][EMBED]
    assert e["format"] == "int8" and e["group_size"] == 32 and e["bits_per_weight"] == 8.5
    if tied:
        assert HEAD not in m["tensors"]
    else:
        h = m["tensors"][HEAD]
        assert h["format"] == "int8" and h["group_size"] == 32
    # the weights (a tiny model's tokenizer and config files outweigh its saving in the embedding)
    assert (m["sizes"]["model.safetensors"] <= m["sizes"]["source"] == r.source_bytes) is smaller
    assert m["quality"]["kld_mean"] >= 0 and "source" in r.summary()


def test_tables_int8_g32_by_default(tiny_hf, tiny_hf_tied, tmp_path):
    for src, tied in ((tiny_hf, False), (tiny_hf_tied, True)):
        out = str(tmp_path / f"t{tied}")
        r = jisu.compress.compress(src, out, "rtn:w4g32", **FAST)
        _check_tables(r, tied)
        with open(os.path.join(out, "config.json")) as f:
            assert json.load(f)["tie_embeddings"] is tied
        llm = jisu.load(out)
        assert len(llm.generate("the", max_tokens=3, temperature=0, ignore_eos=True).token_ids) == 3


def test_growth_is_reported(tiny_gguf, tmp_path):
    """A w8 recipe of a Q4_0 GGUF stores more bits than the source: the result says so."""
    import gguf

    from tests.fixtures import write_gguf_llama

    src = write_gguf_llama(str(tmp_path / "q4.gguf"), tensor_type=gguf.GGMLQuantizationType.Q4_0)
    r = jisu.compress.compress(src, str(tmp_path / "w8"), "rtn:w8+embed+head", **FAST)
    assert r.artifact_bytes > r.source_bytes
    line = r.growth()
    assert line is not None and "\n" not in line and "larger than its source" in line
    r2 = jisu.compress.compress(src, str(tmp_path / "w4"), "rtn:w4g32", **FAST)
    assert r2.manifest["tensors"][EMBED]["format"] == "int4"  # the source's Q4_0 table, kept as it is
    assert r2.manifest["sizes"]["model.safetensors"] < r2.source_bytes


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q5_0])
def test_kquant_gguf_streams(qtype, tmp_path, monkeypatch):
    """A GGUF of K-quant / Q5_0 matrices (no lossless jisu format): read layer by layer as float32,
    the embedding stored as int8 group 32; from Q4_K (4.5 bits per weight everywhere) the int8
    tables make the artifact larger than the file, and the result says so."""
    src = write_kquant_gguf(str(tmp_path / f"{qtype.name}.gguf"), qtype, monkeypatch)
    cfg, lazy, _ = load_streamed(resolve(src))
    assert all(isinstance(lazy[n], SourceWeight) for n in lazy if n.endswith("proj.weight"))
    r = jisu.compress.compress(src, str(tmp_path / "out"), "gptq:w4g32", **FAST)
    _check_tables(r, tied=HEAD not in r.manifest["tensors"], smaller=qtype != T.Q4_K)
    assert (r.growth() is not None) is (r.artifact_bytes > r.source_bytes)
    assert np.isfinite(r.manifest["quality"]["kld_mean"])


def test_default_model_not_larger(default_gguf, tmp_path):
    """The default model (Q4_1 linears, a Q8_0 embedding tied to the head): rtn:w4g32 gives an
    artifact no larger than the GGUF file, the embedding int8 group 32, the KLD measured."""
    r = jisu.compress.compress(default_gguf, str(tmp_path / "d"), "rtn:w4g32", eval_chunks=1, eval_ctx=32,
                               progress=False)
    _check_tables(r, tied=True)
    assert r.artifact_bytes <= r.source_bytes and r.growth() is None
