"""Loads the native module jisu._kernels once; `K` is the module or None (not built)."""
from __future__ import annotations

import os
import warnings

K = None
IMPORT_ERROR = None
if not os.environ.get("JISU_NO_NATIVE"):
    try:
        from jisu import _kernels as K  # noqa: N812
    except ImportError as e:  # not built: ops fall back to PyTorch
        IMPORT_ERROR = e

_warned = False


def get():
    return K


def available() -> bool:
    return K is not None


def warn_fallback() -> None:
    """One-time warning that a CPU op runs on the slow PyTorch path."""
    global _warned
    if not _warned:
        _warned = True
        why = "the native module jisu._kernels is not built" if K is None else "input not supported natively"
        warnings.warn(f"jisu.kernels: using the PyTorch fallback on CPU ({why}; "
                      "build it with `pip install -e .`)", RuntimeWarning, stacklevel=3)
