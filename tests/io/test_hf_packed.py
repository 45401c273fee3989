"""HF folders stored in bf16 / f16, loaded packed: each 2-D tensor stays in the file's bytes (a
PackedGGML over a read-only memory map of the .safetensors, no fp32 copy), 1-D tensors become fp32,
load transforms still apply, and the model's logits match the fp32 reference."""
from __future__ import annotations

import os

import pytest
import torch

import jisu
from jisu.engine.runner import sequence_logits
from jisu.io.sources import load_weights, resolve
from jisu.kernels.packed_ggml import BF16, F16, PackedGGML
from jisu.models import archs
from jisu.models.layers import CausalContext
from tests.fixtures import CASES, build_hf_model, save_hf
from tests.kernels.helpers import needs_native

pytestmark = needs_native

DTYPES = {"bf16": (torch.bfloat16, BF16), "f16": (torch.float16, F16)}


@pytest.fixture(scope="module", params=sorted(DTYPES))
def folder(request, tmp_path_factory):
    dtype, gtype = DTYPES[request.param]
    path = str(tmp_path_factory.mktemp(f"hf_{request.param}"))
    save_hf(build_hf_model(CASES["qwen2"]).to(dtype), path)  # qwen2: q/k/v biases (1-D)
    return path, gtype


def file_mappings(path: str) -> list[tuple[int, int, str]]:
    """(start, end, permissions) of this process's memory mappings of `path`."""
    real, out = os.path.realpath(path), []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and os.path.realpath(parts[5]) == real:
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                out.append((lo, hi, parts[1]))
    return out


def in_mapping(w: PackedGGML, maps) -> str | None:
    """The permissions of the file mapping holding all of w's bytes, or None."""
    p = w.data.data_ptr()
    for lo, hi, perms in maps:
        if lo <= p and p + w.data.numel() <= hi:
            return perms
    return None


def test_matrices_view_the_file(folder):
    path, gtype = folder
    _, packed, _ = load_weights(resolve(path), packed=True)
    _, dense, _ = load_weights(resolve(path), packed=False)
    maps = file_mappings(os.path.join(path, "model.safetensors"))
    assert set(packed) == set(dense)
    n = 0
    for name, ref in dense.items():
        got = packed[name]
        if ref.dim() == 2:
            assert isinstance(got, PackedGGML) and got.gtype == gtype, name
            perms = in_mapping(got, maps)
            assert perms is not None and "w" not in perms, f"{name}: not a read-only view of the file"
            assert torch.equal(got.dequantize(), ref), name
            n += 1
        else:
            assert got.dtype == torch.float32 and torch.equal(got, ref), name
    assert n >= 7 * 2 + 1  # every layer's seven matrices and the embedding


def test_logits_match_fp32_reference(folder):
    path, _ = folder
    fast = jisu.load(path)
    slow = jisu.load(path, packed=False, native=False)
    assert any(isinstance(w, PackedGGML) for w in fast.model.w.values())
    tokens = torch.randint(0, fast.model.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    a = sequence_logits(fast.runner, tokens[0].tolist(), kv_dtype=torch.float32)
    with torch.inference_mode():
        b = slow.model.forward(tokens, CausalContext())[0]
    # fp32 activations times the exact 16-bit weights: only the float summation order differs
    assert float((a - b).abs().max() / b.abs().max()) < 1e-4


def test_load_transform_copies_rows(folder, monkeypatch):
    path, gtype = folder
    cfg, dense, _ = load_weights(resolve(path), packed=False)
    arch = archs()[cfg.arch]
    target = "model.layers.1.self_attn.k_proj.weight"

    def transform(cfg, source, name):
        return (lambda t: t.flip(0)) if source == "hf" and name == target else None

    monkeypatch.setattr(arch, "load_transform", transform)
    _, packed, _ = load_weights(resolve(path), packed=True)
    w = packed[target]
    assert isinstance(w, PackedGGML) and w.gtype == gtype
    assert torch.equal(w.dequantize(), dense[target].flip(0))
    assert in_mapping(w, file_mappings(os.path.join(path, "model.safetensors"))) is None  # a copy
