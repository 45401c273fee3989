"""GGUF reading (GGUF v2/v3 as written by llama.cpp's converters): header validation, metadata,
tensors dequantized through jisu.io.gguf_quants, and the architecture's ModelConfig and HF tensor
names (declared by its jisu.models module; jisu.io.gguf_packed iterates the weights)."""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import JisuError, ModelFormatError, UnsupportedError
from ..models import archs, gguf_archs
from ..models.common import GGUF_GLOBAL_NAMES

GGUF_MAGIC = b"GGUF"
MAX_KV_COUNT = 1 << 20
MAX_TENSOR_COUNT = 1 << 20
MAX_STRING_BYTES = 1 << 28
MAX_DIMS = 4
MAX_ELEMENTS = 1 << 40

# GGUF value types -> numpy dtype of one scalar (strings and arrays handled apart).
_SCALAR_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
                  10: "<u8", 11: "<i8", 12: "<f8"}
_SCALARS = {t: struct.Struct(fmt) for t, fmt in {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f",
                                                  7: "<?", 10: "<Q", 11: "<q", 12: "<d"}.items()}
_U32, _U64 = _SCALARS[4], _SCALARS[10]
_T_STRING, _T_ARRAY, _T_BOOL = 8, 9, 7


@dataclass
class _Header:
    metadata: dict
    tensors: list          # (name, dims in GGUF order, type id, offset from the data start)
    data_start: int


def _read_header(path: str, size: int) -> _Header:
    """Parse the GGUF header (metadata and tensor infos), checking every count and length against
    the bytes that remain before using it, so absurd values are rejected without allocating.
    (gguf.GGUFReader trusts these numbers, and builds a numpy view per string: ~6 s for the
    default model's 100k-token vocabulary, against ~0.2 s here.)"""
    import mmap

    if size == 0:
        raise ModelFormatError(f"{path}: not a valid GGUF file (file too short)")
    with open(path, "rb") as f:  # mapped, not read: only the header's pages are touched
        head = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse_header(path, head)
    finally:
        try:
            head.close()
        except BufferError:  # a numpy view still alive (an exception's traceback): let GC close it
            pass


def _parse_header(path: str, head) -> _Header:
    def fail(what: str) -> ModelFormatError:
        return ModelFormatError(f"{path}: not a valid GGUF file ({what})")

    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise fail("bad magic; expected 'GGUF'" if len(head) >= 4 else "file too short")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", head, 4)
    if version not in (2, 3):
        raise fail(f"unsupported GGUF version {version}")
    if n_tensors > MAX_TENSOR_COUNT or n_kv > MAX_KV_COUNT:
        raise fail(f"absurd counts: {n_tensors} tensors, {n_kv} metadata keys")
    pos = 24

    def need(n: int) -> None:
        if n < 0 or pos + n > len(head):
            raise fail("header is truncated or a length runs past the end")

    def read(scalar: struct.Struct):
        nonlocal pos
        need(scalar.size)
        (v,) = scalar.unpack_from(head, pos)
        pos += scalar.size
        return v

    def read_u64() -> int:
        return read(_U64)

    def read_u32() -> int:
        return read(_U32)

    def read_string(what: str = "string") -> str:
        nonlocal pos
        n = read_u64()
        if n > MAX_STRING_BYTES:
            raise fail(f"string of {n} bytes")
        need(n)
        raw = head[pos:pos + n]
        pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise fail(f"{what} is not UTF-8") from None

    def read_value(vtype: int, depth: int = 0):
        nonlocal pos
        if vtype in _SCALARS:
            return read(_SCALARS[vtype])
        if vtype == _T_STRING:
            return read_string()
        if vtype == _T_ARRAY and depth < 2:
            item_type, count = read_u32(), read_u64()
            if item_type in _SCALAR_DTYPES:
                dt = np.dtype(_SCALAR_DTYPES[item_type])
                need(count * dt.itemsize)
                arr = np.frombuffer(head, dtype=dt, count=count, offset=pos)
                pos += count * dt.itemsize
                out = (arr != 0).tolist() if item_type == _T_BOOL else arr.tolist()
                del arr  # no view of the mapping may outlive the parse
                return out
            if count > len(head) - pos:  # every item takes at least a byte
                raise fail(f"array of {count} items")
            return [read_value(item_type, depth + 1) for _ in range(count)]
        raise fail(f"unknown metadata value type {vtype}")

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = read_string("a metadata key")
        metadata[key] = read_value(read_u32())
    tensors = []
    for _ in range(n_tensors):
        name = read_string("a tensor name")
        n_dims = read_u32()
        if n_dims == 0 or n_dims > MAX_DIMS:
            raise fail(f"tensor with {n_dims} dimensions")
        dims = [read_u64() for _ in range(n_dims)]
        if max(dims) > MAX_ELEMENTS:   # (one dimension of 0 makes the product small, not the others)
            raise fail(f"tensor dimension of {max(dims)}")
        if int(np.prod(dims, dtype=object)) > MAX_ELEMENTS:
            raise fail(f"tensor of {int(np.prod(dims, dtype=object))} elements")
        tensors.append((name, dims, read_u32(), read_u64()))
    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise fail(f"bad general.alignment {align!r}")
    return _Header(metadata, tensors, (pos + align - 1) // align * align)


@dataclass
class GGUFTensor:
    name: str
    qtype: Any              # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # row-major (numpy) order: the reverse of GGUF's ne[]
    data: np.ndarray        # raw bytes, memory-mapped


class GGUFFile:
    """An open GGUF file: metadata as plain Python values and tensors as memory-mapped bytes."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = str(path)
        try:
            size = os.path.getsize(self.path)
        except OSError as e:
            raise ModelFormatError(f"{self.path}: cannot read ({e.strerror})") from None
        header = _read_header(self.path, size)
        self.metadata: dict[str, Any] = header.metadata
        mm = np.memmap(self.path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        self._mm = mm
        self._spans: dict[str, tuple[int, int]] = {}
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, type_id, offset in header.tensors:
            try:
                qtype = gguf.GGMLQuantizationType(type_id)
            except ValueError:
                raise UnsupportedError(f"{self.path}: tensor {name!r} has unknown type id {type_id}") from None
            if name in self.tensors:
                raise ModelFormatError(f"{self.path}: tensor {name!r} appears twice")
            shape = tuple(int(d) for d in reversed(dims))
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            if shape[-1] % block:
                raise ModelFormatError(f"{self.path}: tensor {name!r} row of {shape[-1]} is not a multiple of {block}")
            nbytes = int(np.prod(shape, dtype=np.int64)) // block * type_size
            start = header.data_start + offset
            if start + nbytes > size:
                raise ModelFormatError(f"{self.path}: tensor {name!r} runs past the end of the file (truncated?)")
            self.tensors[name] = GGUFTensor(name, qtype, shape, mm[start:start + nbytes])
            self._spans[name] = (start, nbytes)
        self.arch = str(self.metadata.get("general.architecture", ""))

    def release(self, name: str, part: tuple[int, int] | None = None) -> None:
        """Unmap the pages of a tensor that has been copied or converted from this process (they
        count in its RSS once read; touched again, they come back from the page cache). part:
        (offset, bytes) within the tensor, to release as a large tensor is consumed."""
        import mmap

        m = getattr(self._mm, "_mmap", None)
        if m is None or not hasattr(m, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start, n = self._spans[name]
        if part is not None:
            start, n = start + part[0], min(part[1], n - part[0])
        page = mmap.PAGESIZE
        a, b = start // page * page, min(-(-(start + n) // page) * page, len(m))
        if b > a:
            m.madvise(mmap.MADV_DONTNEED, a, b - a)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def dequantize(self, name: str) -> torch.Tensor:
        from .gguf_quants import dequantize

        t = self.tensors[name]
        try:
            return dequantize(t.data, t.qtype, t.shape)
        except (UnsupportedError, ModelFormatError) as e:
            raise type(e)(f"{self.path}: tensor {name!r}: {e}") from None


# --- architecture mapping ------------------------------------------------------------------

def arch_module(g: GGUFFile):
    """The jisu.models module of the file's general.architecture."""
    module = archs().get(g.arch)
    if module is None or g.arch not in module.GGUF_ARCHS:
        raise UnsupportedError(f"{g.path}: unknown architecture {g.arch!r} (supported: {', '.join(gguf_archs())})")
    return module


def hf_name(gguf_name: str, arch: str) -> str | None:
    """The HF-style name of a GGUF tensor of architecture `arch`, or None if jisu does not use it."""
    if gguf_name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit():
        table = archs()[arch].GGUF_LAYER_NAMES
        if parts[2] in table:
            return f"model.layers.{parts[1]}.{table[parts[2]]}.{parts[3]}"
    return None


def gguf_config(g: GGUFFile) -> ModelConfig:
    shapes = {name: t.shape for name, t in g.tensors.items()}
    from .config_check import checked

    module = arch_module(g)
    try:
        return checked(module.config_from_gguf(g.metadata, shapes, g.path), g.path)
    except (ModelFormatError, UnsupportedError):
        raise
    except JisuError as e:  # ModelConfig's own refusal
        raise ModelFormatError(f"{g.path}: {e}") from None
    except (KeyError, TypeError, ValueError, OverflowError, ZeroDivisionError) as e:
        raise ModelFormatError(f"{g.path}: missing or malformed metadata ({type(e).__name__}: {e})") from None
