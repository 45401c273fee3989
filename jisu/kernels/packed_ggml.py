"""GGML-kind weights: a GGUF tensor's (or a 16-bit safetensors tensor's) own bytes, multiplied in
place by the native kernels (cpu/ggml*.cpp), with no repacking and no fp32 copy. The bytes are
a view of the memory-mapped file as loaded, so resident memory is the pages the kernels read; the
native runner copies them onto huge pages where it can (engine/native_runner.py arena_min_bytes),
releasing the file's pages."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from . import _native
from .packed import PackedWeight

# ggml type ids (gguf.GGMLQuantizationType values) of the 16-bit float types.
F16, BF16 = 1, 30


def native_types() -> frozenset[int]:
    """ggml type ids the native GGML kind runs (empty without the native module)."""
    k = _native.get()
    return frozenset(k.ggml_types()) if k is not None else frozenset()


def as_bytes(a) -> torch.Tensor:
    """A flat uint8 tensor sharing memory with a numpy array or memmap (read-only is fine: the
    kernels only read it)."""
    a = np.asarray(a).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": never written
        return torch.from_numpy(a)


class PackedGGML(PackedWeight):
    """N rows of K values of ggml type `gtype`, row-major, in `data` (uint8, N * row_bytes)."""

    def __init__(self, data: torch.Tensor, N: int, K: int, gtype: int):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.qtype = GGMLQuantizationType(int(gtype))
        block, size = GGML_QUANT_SIZES[self.qtype]
        if K % block:
            raise ValueError(f"{self.qtype.name}: K={K} is not a multiple of its block of {block}")
        self.N, self.K, self.gtype = int(N), int(K), int(gtype)
        self.row_bytes = K // block * size
        if data.dtype != torch.uint8 or data.numel() != self.N * self.row_bytes:
            raise ValueError(f"{self.qtype.name} [{N}, {K}] needs {self.N * self.row_bytes} bytes, got {data.numel()}")
        self.data = data
        self._attach()

    def _make_desc(self):
        if self.gtype not in native_types():
            return None
        return _native.K.make_ggml(self.data.data_ptr(), self.N, self.K, self.gtype)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K], decoded by the gguf package (the reference the kernels are tested against)."""
        from gguf.quants import dequantize

        raw = self.data.cpu().numpy().reshape(self.N, self.row_bytes)
        return torch.from_numpy(np.ascontiguousarray(dequantize(raw, self.qtype), dtype=np.float32))

    def __repr__(self):
        return f"PackedGGML({self.qtype.name}, N={self.N}, K={self.K}, {self.nbytes} bytes)"
