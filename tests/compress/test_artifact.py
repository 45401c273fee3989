"""Artifacts round-trip bit-exactly: the loaded formats equal the in-memory ones, and the loaded
model's logits equal the in-memory quantized model's, for every format and for HF and GGUF sources."""
from __future__ import annotations

import json
import os

import pytest
import torch

import jisu
from jisu.compress import pipeline
from jisu.compress.recipe import parse_recipe
from jisu.io import artifact, text
from jisu.errors import JisuError, ModelFormatError
from jisu.io.sources import load_weights, resolve
from jisu.kernels.packed import PackedWeight
from jisu.models.layers import CausalContext

from .conftest import FAST

TOKENS = torch.tensor([[5, 17, 42, 99, 7, 260, 3, 11, 64, 128, 200, 31]])


def logits(model):
    return model.forward(TOKENS, CausalContext())


def quantize(path, recipe):
    source = resolve(path)
    cfg, weights, tok = load_weights(source)
    rec = parse_recipe(recipe)
    ids = text.calibration_ids(tok, text.read_calibration(None), 8, 32) if rec.needs_calibration else None
    return source, pipeline.quantize_model(cfg, weights, rec, ids, progress=False)


@pytest.mark.parametrize("recipe", ["rtn:w4g32", "rtn:w4g32a", "gptq:w3g32", "rtn:w2g64", "rtn:w8", "gptq:w8g32",
                                    "nf4:g64", "kmeans:g64", "kmeans", "awq:w4g32a", "gptq:w4g64+embed+head",
                                    "mixed:bpw=3.5", "mixed:bpw=3.9:groups"])
def test_round_trip_bit_exact(tiny_hf, tmp_path, recipe):
    source, qz = quantize(tiny_hf, recipe)
    expected = logits(pipeline.build_quantized_model(qz))
    expected_ref = logits(pipeline.build_quantized_model(qz, native=False))  # the PyTorch reference model
    folder = str(tmp_path / "art")
    os.mkdir(folder)
    artifact.write_artifact(folder, qz.cfg, qz.tensors, {"recipe": {"text": recipe}}, source_kind=source.kind,
                            source_path=source.path)
    artifact.verify_artifact(folder)
    formats, _ = artifact.load_formats(folder)
    assert set(formats) == set(qz.tensors)
    for name, obj in qz.tensors.items():
        got = formats[name]
        if isinstance(obj, torch.Tensor):
            assert torch.equal(got, obj), name
        else:
            assert type(got) is type(obj) and torch.equal(got.dequantize(), obj.dequantize()), name
    llm = jisu.load(folder)
    assert isinstance(llm.model.w["model.layers.0.mlp.down_proj.weight"], PackedWeight)
    assert torch.equal(logits(llm.model), expected)
    assert torch.equal(logits(jisu.load(folder, native=False).model), expected_ref)


def test_tied_embeddings_with_head_and_embed(tiny_hf_tied, tmp_path):
    """A tied model: +embed+head with one format stores the matrix once (with GPTQ too: the
    calibrated head serves as the embedding); +head alone unties."""
    for recipe, stored_once in (("rtn:w4g32+embed+head", True), ("gptq:w4g32+embed+head", True),
                                ("rtn:w4g32+head", False)):
        out = str(tmp_path / recipe.replace(":", "_").replace("+", "_"))
        r = jisu.compress.compress(tiny_hf_tied, out, recipe, **FAST)
        entry = r.manifest["tensors"]["lm_head.weight"]
        assert ("same_as" in entry) == stored_once
        with open(os.path.join(out, "config.json")) as f:
            assert json.load(f)["tie_embeddings"] is False
        llm = jisu.load(out)
        assert isinstance(llm.model.w["lm_head.weight"], PackedWeight)
        assert torch.isfinite(logits(llm.model)).all()


def test_gguf_source_keeps_tokenizer_and_template(tiny_gguf, tmp_path):
    out = str(tmp_path / "from_gguf")
    jisu.compress.compress(tiny_gguf, out, "rtn:w4g32", **FAST)
    assert os.path.isfile(os.path.join(out, "tokenizer_gguf.json"))
    src, art = jisu.load(tiny_gguf), jisu.load(out)
    text = "the cat in the hat"
    assert art.tokenizer.encode(text) == src.tokenizer.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert art.tokenizer.encode_chat(msgs) == src.tokenizer.encode_chat(msgs)
    assert art.eos_ids == src.eos_ids
    out_text = art.generate("the", max_tokens=4, temperature=0, ignore_eos=True)
    assert len(out_text.token_ids) == 4


def test_hf_source_copies_tokenizer(tiny_hf, tmp_path):
    out = str(tmp_path / "from_hf")
    r = jisu.compress.compress(tiny_hf, out, "rtn:w8", **FAST)
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= set(r.manifest["files"])
    src, art = jisu.load(tiny_hf), jisu.load(out)
    assert art.tokenizer.encode_chat([{"role": "user", "content": "x"}]) == \
        src.tokenizer.encode_chat([{"role": "user", "content": "x"}])
    assert art.config == src.config


def test_manifest_contents(tiny_hf, tmp_path):
    out = str(tmp_path / "m")
    m = jisu.compress.compress(tiny_hf, out, "gptq:w4g32", **FAST).manifest
    assert m["format"] == "jisu-artifact" and m["format_version"] == artifact.FORMAT_VERSION
    assert m["jisu_version"] == jisu.__version__
    assert m["source"]["path"] == os.path.abspath(tiny_hf) and len(m["source"]["sha256"]) == 64
    assert m["recipe"]["text"] == "gptq:w4g32" and m["calibration"]["tokens"] == 8 * 64
    assert m["bits_per_weight"]["linear"] == pytest.approx(4.5)
    assert m["bits_per_weight"]["total"] > m["bits_per_weight"]["linear"]  # fp32 embedding, head, norms
    e = m["tensors"]["model.layers.1.self_attn.o_proj.weight"]
    assert e["format"] == "int4" and e["group_size"] == 32 and e["sym"] is True
    assert set(e["parts"]) == {"q", "scale"}
    assert m["tensors"]["model.norm.weight"]["format"] == "float32"
    q = m["quality"]
    assert q["tokens_scored"] == 2 * 63
    # the measured figures order as the formats do: int8 is closer to the source than 4 bits
    q8 = jisu.compress.compress(tiny_hf, str(tmp_path / "m8"), "rtn:w8", **FAST).manifest["quality"]
    assert 0 < q8["kld_mean"] < q["kld_mean"] and q8["top1_agreement"] >= q["top1_agreement"] > 0.5
    assert q["kld_median"] <= q["kld_p99"] <= q["kld_max"] and q8["tokens_scored"] == q["tokens_scored"]
    assert q["text"].endswith("[second half]") and m["calibration"]["text"].endswith("[first half]")
    for name, digest in m["files"].items():
        assert artifact.sha256_file(os.path.join(out, name)) == digest
    assert m["sizes"]["model.safetensors"] == os.path.getsize(os.path.join(out, "model.safetensors"))
    layer = m["layers"]["model.layers.0.mlp.down_proj.weight"]
    assert layer["err"] < layer["rtn_err"]


def test_corrupt_artifact_is_refused(tiny_hf, tmp_path):
    out = str(tmp_path / "c")
    jisu.compress.compress(tiny_hf, out, "rtn:w4g32", **FAST)
    path = os.path.join(out, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(-10, 2)
        f.write(b"\xff" * 10)
    with pytest.raises(ModelFormatError, match="sha256"):
        artifact.verify_artifact(out)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(JisuError):
        jisu.load(out)


@pytest.mark.parametrize("recipe", ["rtn:w4g32+embed+head", "gptq:w3g32", "rtn:w8", "rtn:w2g64"])
def test_large_matrices_load_a_slice_of_rows_at_a_time(tiny_hf, tmp_path, monkeypatch, recipe):
    """Integer matrices above SLICED_ELEMS are decoded and packed a slice of rows at a time (their
    codes never whole in memory): the packed bytes equal the one-pass load's."""
    from jisu.kernels import packed as packed_mod
    from tests.kernels.helpers import assert_same_packed_ints

    source, qz = quantize(tiny_hf, recipe)
    folder = str(tmp_path / "art")
    os.mkdir(folder)
    artifact.write_artifact(folder, qz.cfg, qz.tensors, {"recipe": {"text": recipe}}, source_kind=source.kind,
                            source_path=source.path)
    _, whole, _ = artifact.load_artifact(folder)
    monkeypatch.setattr(artifact, "SLICED_ELEMS", 0)
    monkeypatch.setattr(packed_mod, "PACK_CHUNK_BYTES", 64 * 16)  # 16 rows a slice
    _, sliced, _ = artifact.load_artifact(folder)
    assert_same_packed_ints(whole, sliced)


@pytest.mark.parametrize("bpw, narrow", [(3.9, False), (3.0, True)])
def test_mixed_groups_allocation_within_budget(tiny_hf, bpw, narrow):
    """mixed ":groups" chooses per linear among 3/4-bit at groups 64 and 32 and int8, within the
    budget; 2-bit is only considered (its errors only computed) when 3-bit group 64 cannot fit."""
    _, qz = quantize(tiny_hf, f"mixed:bpw={bpw}:groups")
    info = qz.info["mixed"]
    assert info["allocated_bpw"] <= bpw + 1e-9
    assert ("2.5" in info["linears_per_bits"]) == narrow
    used = {float(b) for b, c in info["linears_per_bits"].items() if c}
    if not narrow:
        assert used <= {3.25, 3.5, 4.25, 4.5, 8} and len(used) >= 2
    names = set(info["bits"])
    for name in names:
        f = qz.tensors[name]
        assert (f.bits, f.group_size) in {(2, 32), (3, 64), (3, 32), (4, 64), (4, 32), (8, None)}, name
