"""Hypothesis strategies of hostile values: JSON documents and GGUF metadata values, weighted
toward the numbers and shapes that break parsers (zero, negative, huge, NaN, wrong types)."""
from __future__ import annotations

from hypothesis import strategies as st

from .mutate import INTERESTING

_INTS = st.one_of(st.sampled_from(INTERESTING + [-1, -2, -(2**31), -(2**63)]), st.integers())
_FLOATS = st.one_of(st.sampled_from([0.0, -0.0, 1e-30, 0.5, 1.0, 1e30, float("nan"), float("inf"), float("-inf")]),
                    st.floats())
_TEXT = st.one_of(st.sampled_from(["", "a", "llama", "F32", "float32", "\ud800", "../x", "null"]), st.text(max_size=12))


def scalar():
    return st.one_of(_INTS, _FLOATS, _TEXT, st.booleans(), st.none())


def json_value(depth: int = 2):
    return st.recursive(scalar(), lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(_TEXT, inner, max_size=4)),
                        max_leaves=8)


def metadata_value():
    """What a GGUF metadata value can be: a scalar or an array (of scalars or arrays)."""
    gguf_scalar = st.one_of(_INTS, _FLOATS, _TEXT, st.booleans())
    return st.one_of(gguf_scalar, st.lists(gguf_scalar, max_size=6), st.lists(st.lists(gguf_scalar, max_size=3),
                                                                              max_size=3))
