"""HF model folders: config.json + single or sharded *.safetensors, memory-mapped. Never pickle."""
from __future__ import annotations

import json
import os
import struct
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import ModelFormatError, UnsupportedError
from ..models import archs, hf_types

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 << 20
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_SAFETENSORS_DTYPES = set(_TORCH_DTYPES)


@contextmanager
def _reading(path: str, corrupt: str):
    """A file that cannot be read, or does not parse, as a one-line ModelFormatError."""
    try:
        yield
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: {corrupt} ({e})") from None


def read_json(path: str) -> dict:
    with _reading(path, "not valid JSON"), open(path, "rb") as f:
        value = json.loads(f.read(64 << 20))
    if not isinstance(value, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    return value


def _checked_child(folder: str, name: Any, what: str) -> str:
    """A file name read from inside a file: must be a plain name within `folder`."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/") \
            or "/" in name or "\\" in name:
        raise ModelFormatError(f"{folder}: {what} names an unsafe path {name!r}")
    return os.path.join(folder, name)


def check_safetensors(path: str) -> tuple[dict, int]:
    """Validate a safetensors header before the library maps it: sizes, dtypes, offsets. Returns
    the header and the file offset of the data (data_offsets count from there)."""
    with _reading(path, "corrupt safetensors header"):
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelFormatError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise ModelFormatError(f"{path}: corrupt safetensors header (declares {n} header bytes, file has {size})")
            header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: corrupt safetensors header (not an object)")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = 1
            for d in shape:
                if not isinstance(d, int) or d < 0:
                    raise ValueError
                numel *= d
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(f"{path}: tensor {name!r} has a malformed entry") from None
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
            raise UnsupportedError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_size):
            raise ModelFormatError(f"{path}: tensor {name!r} lies past the end of the file (truncated?)")
    return header, 8 + n


class SafetensorsFile:
    """The tensors of one safetensors file through the header `check_safetensors` validated: each a
    view of one private memory map of the file (torch's `UntypedStorage.from_file`, the mapping the
    safetensors library itself makes for PyTorch), so reading a tensor copies nothing. Not the
    library's `get_tensor`: with framework "pt" it keeps ~64 bytes per call for good (safetensors
    0.8.0), and a process that loads file after file (a server swapping models, a fuzzer) grew
    without bound."""

    def __init__(self, path: str):
        self.path = path
        self.header, self.base = check_safetensors(path)
        self._storage = None

    def keys(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]

    def get_tensor(self, name: str) -> torch.Tensor:
        info = self.header.get(name) if name != "__metadata__" else None
        if info is None:
            raise ModelFormatError(f"{self.path}: no tensor {name!r}")
        dtype, shape = _TORCH_DTYPES[info["dtype"]], info["shape"]
        start, end = info["data_offsets"]
        numel = 1
        for d in shape:
            numel *= d
        if end - start != numel * dtype.itemsize:
            raise ModelFormatError(f"{self.path}: tensor {name!r} holds {end - start} bytes, its shape "
                                   f"{shape} and dtype {info['dtype']} need {numel * dtype.itemsize}")
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        try:
            if self._storage is None:
                self._storage = torch.UntypedStorage.from_file(self.path, shared=False,
                                                               nbytes=os.path.getsize(self.path))
            raw = torch.asarray(self._storage[self.base + start:self.base + end], dtype=torch.uint8)
            if (self.base + start) % dtype.itemsize:   # a misaligned tensor (legal, rare): copied
                raw = raw.clone()
            return raw.view(dtype).reshape([int(d) for d in shape])
        except (OSError, RuntimeError, TypeError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelFormatError(f"{self.path}: tensor {name!r} cannot be read ({msg})") from None


def safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFormatError(f"{index}: missing weight_map")
        return [_checked_child(folder, f, "weight_map") for f in dict.fromkeys(weight_map.values())]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if files:
        return [os.path.join(folder, f) for f in files]
    if any(f.endswith(PICKLE_SUFFIXES) for f in os.listdir(folder)):
        raise ModelFormatError(f"{folder}: only pickle checkpoints (*.bin/*.pt) found; jisu loads safetensors and "
                               f"GGUF only (pickle can run code). Convert with safetensors first.")
    raise ModelFormatError(f"{folder}: no *.safetensors weights found")


# safetensors dtypes the GGML kind runs in place (ggml type ids)
_GGML_DTYPES = {"F16": 1, "BF16": 30}


def iter_safetensors(files: list[str], packed: bool = False) -> Iterator[tuple[str, Any]]:
    """(name, tensor) for every tensor of the files. packed=True: a 2-D F16 / BF16 tensor becomes a
    PackedGGML whose bytes view a read-only memory map of the file (no copy; the kernels read the
    16-bit values in place); other tensors are read as they are stored."""
    ggml = frozenset()
    if packed:
        from ..kernels.packed_ggml import native_types

        ggml = native_types()
    for path in files:
        f = SafetensorsFile(path)
        mm = None
        try:
            for name in f.keys():
                info = f.header[name]
                gtype = _GGML_DTYPES.get(info["dtype"])
                if gtype in ggml and len(info["shape"]) == 2 and min(info["shape"]) > 0:
                    if mm is None:
                        mm = np.memmap(path, dtype=np.uint8, mode="r")
                    yield name, _in_place(mm, f.base, info, gtype)
                else:
                    yield name, f.get_tensor(name)
        except Exception as e:  # a mapping that fails, a view torch refuses
            if isinstance(e, (ModelFormatError, UnsupportedError)):
                raise
            raise ModelFormatError(f"{path}: corrupt safetensors file ({e})") from None


def _in_place(mm: np.memmap, base: int, info: dict, gtype: int):
    """The PackedGGML of one 2-D 16-bit tensor over its bytes in the file's memory map."""
    from ..kernels.packed_ggml import PackedGGML, as_bytes

    (N, K), (start, end) = info["shape"], info["data_offsets"]
    if end - start != 2 * N * K:
        raise ModelFormatError(f"tensor of shape {[N, K]} holds {end - start} bytes, not {2 * N * K}")
    return PackedGGML(as_bytes(mm[base + start:base + end]), N, K, gtype)


def hf_config(folder: str) -> ModelConfig:
    """The ModelConfig of an HF folder, parsed by the module of its config.json's model_type."""
    path = os.path.join(folder, "config.json")
    d = read_json(path)
    model_type = d.get("model_type")
    module = archs().get(model_type) if isinstance(model_type, str) else None
    if module is None or d["model_type"] not in module.HF_TYPES:
        raise UnsupportedError(f"{path}: unknown architecture {d.get('model_type')!r} "
                               f"(supported: {', '.join(hf_types())})")
    from .config_check import checked

    try:
        return checked(module.config_from_hf(d, path), path)
    except (KeyError, TypeError, ValueError, OverflowError, ZeroDivisionError) as e:
        raise ModelFormatError(f"{path}: missing or malformed field ({type(e).__name__}: {e})") from None
