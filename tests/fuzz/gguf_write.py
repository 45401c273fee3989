"""A minimal GGUF v3 writer for the structured GGUF harness: any metadata values (the types a
value would be stored as are picked from the Python value) over a base file's tensors."""
from __future__ import annotations

import math
import struct

_I32, _U32, _I64, _U64, _F32, _BOOL, _STR, _ARR, _F64 = 5, 4, 11, 10, 6, 7, 8, 9, 12


def _vtype(v) -> int:
    if isinstance(v, bool):
        return _BOOL
    if isinstance(v, int):
        if 0 <= v < 1 << 32:
            return _U32
        if -(1 << 31) <= v < 0:
            return _I32
        return _U64 if v >= 0 else _I64
    if isinstance(v, float):
        return _F32 if v != v or abs(v) in (0.0, float("inf")) or 1e-38 < abs(v) < 3e38 else _F64
    if isinstance(v, list):
        return _ARR
    return _STR


def _string(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw


def _value(v, t: int) -> bytes:
    if t == _BOOL:
        return struct.pack("<?", bool(v))
    if t in (_U32, _I32, _U64, _I64):
        fmt = {_U32: "<I", _I32: "<i", _U64: "<Q", _I64: "<q"}[t]
        bits = 32 if t in (_U32, _I32) else 64
        v = int(v) & ((1 << bits) - 1)
        if t in (_I32, _I64) and v >= 1 << (bits - 1):
            v -= 1 << bits
        return struct.pack(fmt, v)
    if t in (_F32, _F64):
        v = float(v)
        if t == _F32 and v == v and abs(v) > 3.4e38:
            v = math.copysign(math.inf, v)  # as a float32 cast would round it
        return struct.pack("<f" if t == _F32 else "<d", v)
    if t == _ARR:
        item = _vtype(v[0]) if v else _U32
        if any(_vtype(x) != item for x in v):  # mixed items: stored as the first item's type
            item = _STR if item == _STR else item
        body = b"".join(_value(x if item != _STR else str(x), item) if _compatible(x, item) else
                        _value(_default(item), item) for x in v)
        return struct.pack("<IQ", item, len(v)) + body
    return _string(v if isinstance(v, str) else str(v))


def _compatible(x, t: int) -> bool:
    return t == _STR or _vtype(x) == t or (t in (_U32, _I32, _U64, _I64) and isinstance(x, int)) or \
        (t in (_F32, _F64) and isinstance(x, (int, float)) and not isinstance(x, bool))


def _default(t: int):
    return {_BOOL: False, _STR: "", _ARR: []}.get(t, 0)


def write_gguf(metadata: dict, tensors: list, data: bytes) -> bytes:
    """GGUF bytes: `metadata` (key -> value), `tensors` ((name, dims, type, offset)), then `data`
    (the tensors' bytes, placed at the next multiple of 32)."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, v in metadata.items():
        t = _vtype(v)
        out += _string(key) + struct.pack("<I", t) + _value(v, t)
    for name, dims, ttype, offset in tensors:
        out += _string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ttype, offset)
    out += b"\0" * (-len(out) % 32)
    return bytes(out) + data
