"""Round-to-nearest quantization of one weight matrix [N, K] into a logical format."""
from __future__ import annotations

import torch

from ..kernels.formats import Int2Weight, Int3Weight, Int4Weight, Int8Weight
from .spec import FormatSpec

INT_CLASSES = {2: Int2Weight, 3: Int3Weight, 4: Int4Weight}


def quantize(w: torch.Tensor, spec: FormatSpec):
    """RTN through the formats' own quantize_rtn (codebooks: jisu.compress.codebook)."""
    if spec.kind == "int":
        if spec.bits == 8:
            return Int8Weight.quantize_rtn(w, spec.group_size)
        return INT_CLASSES[spec.bits].quantize_rtn(w, spec.group_size, sym=spec.sym)
    from . import codebook

    return codebook.quantize(w, spec)


def quantize_group(weights, H, specs, step) -> list:
    """The METHODS interface: each weight by its spec (H unused)."""
    return [quantize(w, spec) for w, spec in zip(weights, specs)]
