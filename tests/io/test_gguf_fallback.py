"""A GGUF matrix type without a native kernel: one warning saying what the reference path costs, or
a one-line error when its fp32 copy would not fit in memory — never a silent fp32 blow-up."""
from __future__ import annotations

import warnings

import gguf
import pytest
import torch

from jisu.errors import UnsupportedError
from jisu.io import gguf_packed
from jisu.io.sources import load_weights, resolve
from jisu.kernels.packed_ggml import PackedGGML

from ..fixtures import write_gguf_llama


@pytest.fixture
def f16_gguf(tmp_path):
    return write_gguf_llama(str(tmp_path / "tiny-f16.gguf"), tensor_type=gguf.GGMLQuantizationType.F16)


def test_unpacked_type_warns_with_its_cost(f16_gguf, monkeypatch):
    import jisu.kernels.packed_ggml as pg

    monkeypatch.setattr(pg, "native_types", lambda: frozenset())
    with pytest.warns(RuntimeWarning, match=r"F16 tensors have no native kernel: dequantized to fp32 .* MB in memory"):
        _, weights, _ = load_weights(resolve(f16_gguf), packed=True)
    mats = [w for n, w in weights.items() if n.endswith("proj.weight")]
    assert mats and all(isinstance(w, torch.Tensor) and w.dtype == torch.float32 for w in mats)


def test_unpacked_type_too_large_is_one_line_error(f16_gguf, monkeypatch):
    import jisu.kernels.packed_ggml as pg

    monkeypatch.setattr(pg, "native_types", lambda: frozenset())
    monkeypatch.setattr(gguf_packed, "_available_bytes", lambda: 1000)
    with pytest.raises(UnsupportedError) as e:
        load_weights(resolve(f16_gguf), packed=True)
    msg = str(e.value)
    assert "\n" not in msg and "no native kernel" in msg and "GB is available" in msg


def test_native_type_stays_in_file_bytes(f16_gguf):
    import jisu.kernels.packed_ggml as pg

    if gguf.GGMLQuantizationType.F16 not in pg.native_types():
        pytest.skip("no native F16 kernel in this build")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _, weights, _ = load_weights(resolve(f16_gguf), packed=True)
    mats = {n: w for n, w in weights.items() if n.endswith("proj.weight")}
    assert mats and all(isinstance(w, PackedGGML) for w in mats.values())
