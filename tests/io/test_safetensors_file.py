"""jisu's safetensors reader (`io.hf.SafetensorsFile`, used by the HF, artifact and streaming
loaders) gives the safetensors library's own tensors for every dtype, copies nothing, rejects a
tensor whose bytes do not match its shape in one line, and keeps no memory per read."""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from jisu.errors import ModelFormatError
from jisu.io.hf import SafetensorsFile
from jisu.memory import _proc_kib, trim_heap


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    return {"f32": x, "f16": x.half(), "bf16": x.bfloat16(), "f64": x.double(),
            "i8": torch.randint(-128, 127, (7,), dtype=torch.int8, generator=g),
            "u8": torch.randint(0, 255, (2, 3, 4), dtype=torch.uint8, generator=g),
            "i16": torch.arange(-5, 5, dtype=torch.int16), "i32": torch.arange(9, dtype=torch.int32).view(3, 3),
            "i64": torch.arange(4, dtype=torch.int64), "bool": torch.tensor([True, False, True]),
            "f8": x.to(torch.float8_e4m3fn), "f8b": x.to(torch.float8_e5m2),
            "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}


def test_every_dtype_equals_the_library(tmp_path):
    path = str(tmp_path / "t.safetensors")
    save_file(_tensors(), path)
    ref, f = load_file(path), SafetensorsFile(path)
    assert sorted(f.keys()) == sorted(ref)
    for name, want in ref.items():
        got = f.get_tensor(name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        raw = lambda t: t.reshape(-1).view(torch.uint8)  # noqa: E731 - bytes compare (NaN-proof, any dtype)
        assert torch.equal(raw(got), raw(want)), name


def _write_raw(path: str, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def test_misaligned_tensor_is_read_by_copy(tmp_path):
    # a 1-byte tensor first puts the float32 one at an odd file offset (legal; the library's
    # writer pads, other writers need not)
    path = str(tmp_path / "odd.safetensors")
    x = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float32)
    hdr = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
           "b": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]}}
    text = json.dumps(hdr).encode()
    text += b" " * (-(8 + len(text)) % 4)   # data starts 4-aligned: "b" starts at 1 mod 4
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"\x07" + x.numpy().tobytes())
    f = SafetensorsFile(path)
    assert (f.base + 1) % 4 != 0
    assert torch.equal(f.get_tensor("b"), x) and f.get_tensor("a").tolist() == [7]


def test_bytes_that_do_not_match_the_shape_are_one_line(tmp_path):
    path = str(tmp_path / "bad.safetensors")
    _write_raw(path, {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, bytes(24))
    with pytest.raises(ModelFormatError, match="holds 20 bytes") as e:
        SafetensorsFile(path).get_tensor("w")
    assert "\n" not in str(e.value)
    with pytest.raises(ModelFormatError, match="no tensor"):
        SafetensorsFile(path).get_tensor("missing")


def test_reads_keep_no_memory(tmp_path):
    """The library's get_tensor (framework "pt") kept ~64 bytes per call: 2000 opens of 16 tensors
    would keep ~2 MiB for good. Ours keeps none (the bound leaves room for one 1 MiB pymalloc arena
    left partly used)."""
    path = str(tmp_path / "m.safetensors")
    save_file({f"t{i}": torch.full((4, 4), float(i)) for i in range(16)}, path)

    def opens(n):
        for _ in range(n):
            f = SafetensorsFile(path)
            for k in f.keys():
                f.get_tensor(k)

    opens(100)
    trim_heap(collect=True)
    before = _proc_kib("/proc/self/status", "VmRSS:")
    opens(2000)
    trim_heap(collect=True)
    after = _proc_kib("/proc/self/status", "VmRSS:")
    if before is None or after is None:
        pytest.skip("no /proc here")
    assert after - before < 1 << 20, f"{(after - before) >> 10} KiB kept by 2000 x 16 reads"
