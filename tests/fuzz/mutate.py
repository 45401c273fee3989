"""Byte mutations as JSON-able cases: a list of [op, position, value] applied to a base file, so a
found case is replayable from a seed file (positions wrap around the base's length)."""
from __future__ import annotations

import struct

from hypothesis import strategies as st

# Values that break parsers: zero, one, sign and width boundaries, huge counts.
INTERESTING = [0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 16, 31, 32, 33, 63, 64, 127, 128, 255, 256, 1023, 1024, 4096,
               65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**63 - 1, 2**63, 2**64 - 1]


def ops_strategy(hot: int, size: int, max_ops: int = 6):
    """Mutations mostly inside the first `hot` bytes (the header), some anywhere in `size`."""
    pos = st.one_of(st.integers(0, max(hot - 1, 0)), st.integers(0, max(hot - 1, 0)), st.integers(0, max(size - 1, 0)))
    op = st.one_of(
        st.tuples(st.just("byte"), pos, st.integers(0, 255)),
        st.tuples(st.just("bit"), pos, st.integers(0, 7)),
        st.tuples(st.just("u32"), pos, st.sampled_from(INTERESTING).map(lambda v: v & 0xFFFFFFFF)),
        st.tuples(st.just("u64"), pos, st.sampled_from(INTERESTING)),
        st.tuples(st.just("cut"), pos, st.just(0)),
        st.tuples(st.just("del"), pos, st.integers(1, 64)),
        st.tuples(st.just("ins"), pos, st.binary(min_size=1, max_size=16).map(lambda b: b.hex())),
        st.tuples(st.just("dup"), pos, st.integers(1, 256)),
    ).map(list)
    return st.lists(op, min_size=1, max_size=max_ops)


def apply(base: bytes, ops: list) -> bytes:
    b = bytearray(base)
    for op, pos, value in ops:
        if not b and op != "ins":
            continue
        p = pos % max(len(b), 1)
        if op == "byte":
            b[p] = value & 0xFF
        elif op == "bit":
            b[p] ^= 1 << (value & 7)
        elif op in ("u32", "u64"):
            raw = struct.pack("<I" if op == "u32" else "<Q", value)
            b[p:p + len(raw)] = raw[:len(b) - p]
        elif op == "cut":
            del b[p:]
        elif op == "del":
            del b[p:p + value]
        elif op == "ins":
            b[p:p] = bytes.fromhex(value)
        elif op == "dup":
            b[p:p] = b[p:p + value]
    return bytes(b)
