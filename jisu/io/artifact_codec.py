"""How one weight of a jisu artifact is stored in model.safetensors: a logical format
(jisu.kernels.formats) as its named parts (NAME.q bit-packed codes, NAME.scale, NAME.min, NAME.idx,
NAME.codebook), or a plain tensor under its own name; and back.

Codes are packed little-endian within each row: 8 codes of `bits` bits make `bits` bytes, code
i of the 8 in bits [bits*i, bits*(i+1)). Scales are float16 where that is exact (the formats
round group scales to float16), else float32. Never pickle: safetensors and JSON only.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import ModelFormatError, UnsupportedError

PACK_ROWS_ELEMS = 1 << 20  # codes packed per slice

def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] (K % 8 == 0, values < 2**bits) -> uint8 [N, K * bits // 8]."""
    N, K = codes.shape
    if bits == 8:
        return codes.contiguous()
    out = torch.empty(N, K * bits // 8, dtype=torch.uint8)
    shift = bits * torch.arange(8, dtype=torch.int32)
    byte = 8 * torch.arange(bits, dtype=torch.int64)
    rows = max(1, PACK_ROWS_ELEMS // max(K, 1))   # row slices: the int64 temporaries stay small
    for r0 in range(0, N, rows):
        c = codes[r0:r0 + rows].to(torch.int32).view(-1, K // 8, 8)
        v = (c << shift).sum(-1, dtype=torch.int64)                  # < 2**(8*bits)
        b = (v[..., None] >> byte) & 255                              # [n, K/8, bits]
        out[r0:r0 + rows] = b.to(torch.uint8).view(-1, K * bits // 8)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of pack_bits, with small intermediates (uint8 shifts; int32 for 3 bits)."""
    N = packed.shape[0]
    p = packed.view(torch.uint8)
    if bits == 8:
        return p.reshape(N, K)
    out = torch.empty(N, K, dtype=torch.uint8)
    rows = max(1, PACK_ROWS_ELEMS // max(K, 1))   # row slices: the temporaries stay small
    for r0 in range(0, N, rows):
        _unpack_rows(p[r0:r0 + rows], bits, K, out[r0:r0 + rows])
    return out


def _unpack_rows(p: torch.Tensor, bits: int, K: int, out: torch.Tensor) -> None:
    n = p.shape[0]
    if bits in (2, 4):
        per = 8 // bits
        o = out.view(n, K // per, per)
        for i in range(per):
            torch.bitwise_and(p >> (bits * i), (1 << bits) - 1, out=o[:, :, i])
        return
    b = p.reshape(n, K // 8, bits).to(torch.int32)
    v = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)   # 3 bits: 8 codes in 3 bytes
    o = out.view(n, K // 8, 8)
    for i in range(8):
        o[:, :, i] = (v >> (bits * i)) & ((1 << bits) - 1)


def _compact(t: torch.Tensor) -> torch.Tensor:
    """float16 when that holds the values exactly, else float32."""
    t = t.to(torch.float32).contiguous()
    h = t.to(torch.float16)
    return h if torch.equal(h.to(torch.float32), t) else t


# --- formats <-> tensors ------------------------------------------------------------------------

class Encoded:
    """A weight already in its stored form (the named parts encode() gives and its manifest
    entry): what a streaming compression keeps of a finished layer (codes bit-packed)."""

    def __init__(self, name: str, parts: dict, entry: dict):
        self.name, self.parts, self.entry = name, parts, entry

    @classmethod
    def of(cls, name: str, obj) -> "Encoded":
        return obj if isinstance(obj, Encoded) else cls(name, *encode(name, obj))

    @property
    def shape(self) -> tuple:
        return tuple(self.entry["shape"])

    def decode(self):
        """The format object (or tensor) again."""
        return decode(self.name, self.entry, lambda key: self.parts[key])

    def dequantize(self) -> torch.Tensor:
        obj = self.decode()
        return obj if isinstance(obj, torch.Tensor) else obj.dequantize()


def encode(name: str, obj) -> tuple[dict[str, torch.Tensor], dict]:
    """(safetensors entries, manifest entry) for one weight: a format object, a tensor or an
    Encoded one."""
    from ..kernels.formats import NF4_TABLE, CodebookWeight, Int8Weight, IntWeight

    if isinstance(obj, Encoded):
        if obj.name != name:
            raise ValueError(f"{obj.name} stored as {name}")
        return obj.parts, obj.entry
    if type(obj).__name__ == "LowRankWeight":
        return _encode_lowrank(name, obj)
    if isinstance(obj, torch.Tensor):
        t = obj.detach().contiguous()
        entry = {"format": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "parts": {"data": name}}
        return {name: t}, _sized(entry, {name: t})
    N, K = obj.shape
    parts: dict[str, torch.Tensor] = {}
    if isinstance(obj, Int8Weight):
        entry = {"format": "int8", "group_size": obj.group_size}
        parts["q"] = obj.q.to(torch.int8).contiguous()
        parts["scale"] = (obj.scale.to(torch.float32).contiguous() if obj.group_size is None
                          else _compact(obj.scale))
    elif isinstance(obj, IntWeight):
        entry = {"format": f"int{obj.bits}", "group_size": obj.group_size, "sym": not obj.asym,
                 "packing": "le-bits"}
        parts["q"] = pack_bits(obj.q.to(torch.uint8), obj.bits)
        parts["scale"] = _compact(obj.scale)
        if obj.asym:
            parts["min"] = _compact(obj.min)
    elif isinstance(obj, CodebookWeight):
        cb = obj.codebook.to(torch.float32)
        nf4 = torch.equal(cb, NF4_TABLE.expand_as(cb))
        entry = {"format": "codebook", "table": "nf4" if nf4 else "per-row", "entries": 16,
                 "group_size": obj.group_size if obj.scale is not None else None, "packing": "le-bits"}
        parts["idx"] = pack_bits(obj.idx.to(torch.uint8), 4)
        if not nf4:
            parts["codebook"] = _compact(cb)
        if obj.scale is not None:
            parts["scale"] = _compact(obj.scale)
    else:
        raise TypeError(f"{name}: cannot store {type(obj).__name__}")
    entry["shape"] = [N, K]
    named = {f"{name}.{k}": v for k, v in parts.items()}
    entry["parts"] = {k: f"{name}.{k}" for k in parts}
    return named, _sized(entry, named)


LOWRANK_PARTS = ("lowrank_a", "lowrank_a_scale", "lowrank_b", "lowrank_b_scale")


def _encode_lowrank(name: str, obj) -> tuple[dict[str, torch.Tensor], dict]:
    """A base format (or none: format "lowrank") plus its int8 factors NAME.lowrank_a [N, r],
    NAME.lowrank_b [r, K] and their per-row scales; the entry's bytes count them all."""
    f = obj.factors
    if obj.base is None:
        named, entry = {}, {"format": "lowrank", "shape": list(obj.shape), "parts": {}}
    else:
        named, entry = encode(name, obj.base)
        entry = {k: v for k, v in entry.items() if k not in ("bytes", "bits_per_weight")}
        entry["parts"] = dict(entry["parts"])
    tensors = dict(zip(LOWRANK_PARTS, (f.a.to(torch.int8).contiguous(), _compact(f.a_scale),
                                       f.b.to(torch.int8).contiguous(), _compact(f.b_scale))))
    for k, t in tensors.items():
        named[f"{name}.{k}"] = t
        entry["parts"][k] = f"{name}.{k}"
    entry["lowrank"] = f.rank
    return named, _sized(entry, named)


def _decode_lowrank(name: str, entry: dict, get) -> Any:
    from ..kernels.lowrank import Factors, LowRankWeight

    r, (N, K) = entry["lowrank"], entry["shape"]
    if not isinstance(r, int) or r <= 0:
        raise ModelFormatError(f"{name}: bad low-rank rank {r!r}")
    parts = entry["parts"]
    if any(k not in parts for k in LOWRANK_PARTS):
        raise ModelFormatError(f"{name}: manifest lists no low-rank factors")
    want = {"lowrank_a": (N, r), "lowrank_a_scale": (N,), "lowrank_b": (r, K), "lowrank_b_scale": (r,)}
    got = {}
    for k, shp in want.items():
        t = get(parts[k])
        if tuple(t.shape) != shp:
            raise ModelFormatError(f"{name}: {k} has shape {tuple(t.shape)}, expected {shp}")
        got[k] = t
    factors = Factors(got["lowrank_a"].view(torch.int8), got["lowrank_a_scale"].to(torch.float32),
                      got["lowrank_b"].view(torch.int8), got["lowrank_b_scale"].to(torch.float32))
    base = None
    if entry["format"] != "lowrank":
        rest = {k: v for k, v in entry.items() if k != "lowrank"}
        rest["parts"] = {k: v for k, v in parts.items() if k not in LOWRANK_PARTS}
        base = decode(name, rest, get)
    return LowRankWeight(base, factors)


def _sized(entry: dict, tensors: dict) -> dict:
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    numel = 1
    for d in entry["shape"]:
        numel *= d
    entry["bytes"] = nbytes
    entry["bits_per_weight"] = nbytes * 8 / numel if numel else 0.0
    return entry


def decode(name: str, entry: dict, get) -> Any:
    """The format object (or tensor) for a manifest entry; `get(key)` reads a safetensors tensor."""
    from ..kernels.formats import NF4_TABLE, CodebookWeight, Int8Weight
    from ..kernels.formats import Int2Weight, Int3Weight, Int4Weight

    if isinstance(entry, dict) and "lowrank" in entry:
        try:
            return _decode_lowrank(name, entry, get)
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(f"manifest entry for {name} is malformed") from None
    try:
        kind, shape, parts = entry["format"], entry["shape"], entry["parts"]
        N, K = (shape + [0, 0])[:2] if kind in ("int8", "int2", "int3", "int4", "codebook") else (0, 0)
    except (KeyError, TypeError, ValueError):
        raise ModelFormatError(f"manifest entry for {name} is malformed") from None

    def part(k):
        if k not in parts:
            raise ModelFormatError(f"{name}: manifest lists no part {k!r}")
        return get(parts[k])

    def check(t, shp, what):
        if tuple(t.shape) != tuple(shp):
            raise ModelFormatError(f"{name}: {what} has shape {tuple(t.shape)}, expected {tuple(shp)}")
        return t

    g = entry.get("group_size")
    if g is not None and (not isinstance(g, int) or g <= 0 or K % g):
        raise ModelFormatError(f"{name}: bad group size {g!r} for K={K}")
    ng = K // g if g else None
    if kind == "int8":
        q = check(part("q"), (N, K), "q").view(torch.int8)
        s = check(part("scale"), (N,) if g is None else (N, ng), "scale").to(torch.float32)
        return Int8Weight(q, s, g)
    if kind in ("int2", "int3", "int4"):
        bits = int(kind[3:])
        cls = {2: Int2Weight, 3: Int3Weight, 4: Int4Weight}[bits]
        q = unpack_bits(check(part("q"), (N, K * bits // 8), "q"), bits, K)
        s = check(part("scale"), (N, ng), "scale").to(torch.float32)
        m = None if entry.get("sym", True) else check(part("min"), (N, ng), "min").to(torch.float32)
        return cls(q, s, g, m)
    if kind == "codebook":
        idx = unpack_bits(check(part("idx"), (N, K // 2), "idx"), 4, K)
        if entry.get("table") == "nf4":
            cb = NF4_TABLE.expand(N, 16).contiguous()
        else:
            cb = check(part("codebook"), (N, 16), "codebook").to(torch.float32)
        s = check(part("scale"), (N, ng), "scale").to(torch.float32) if g else None
        return CodebookWeight(idx, cb, s, g)
    if kind in ("float32", "float16", "bfloat16"):
        t = check(part("data"), shape, "tensor")
        return t if t.dtype == torch.float32 else t.float()
    raise UnsupportedError(f"{name}: unknown tensor format {kind!r} (artifact from a newer jisu?)")


# --- config -------------------------------------------------------------------------------------
