"""Weights onto llama.cpp's grids: round-to-nearest, or GPTQ with the grid (every block's scales
and mins, the K-quants' sub-scales and super-scales) fixed from the weights before the columns are
swept, so each weight is rounded onto exactly the grid the GGUF stores; and the lossless mapping
of an artifact's int8 / int4 group-32 weights onto Q8_0 / Q4_0 / Q4_1."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

from . import grids


@dataclass
class GridWeight:
    """A matrix on a llama.cpp grid: codes [N, K] (int16) and the grid's parameters."""
    codes: torch.Tensor
    grid: grids.Grid

    @property
    def qtype(self) -> str:
        return self.grid.qtype

    @property
    def shape(self):
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        return grids.dequantize(self.codes, self.grid)

    def pack(self) -> np.ndarray:
        return grids.pack(self.codes, self.grid)


def rtn(w: torch.Tensor, qtype: str, imp: Optional[torch.Tensor] = None) -> GridWeight:
    grid = grids.fit(qtype, w, imp)
    return GridWeight(grids.round_codes(w, grid), grid)


def gptq_on_grid(w: torch.Tensor, prep, qtype: str) -> GridWeight:
    """GPTQ of w [N, K] (prep: jisu.compress.gptq.prepare(H)) onto the grid fitted to w up front
    under diag(H) (static groups: the column order may be act-order's)."""
    from ..compress import gptq

    grid = grids.fit(qtype, w, prep.hdiag)
    g = grid.g
    WT = w.detach().T.to(torch.float32).contiguous().clone()
    WT[prep.dead] = 0.0
    if prep.perm is not None:
        gptq._permute_rows_(WT, prep.perm.tolist())
        group_of = (prep.perm // g).tolist()
    else:
        group_of = [c // g for c in range(WT.shape[0])]
    with gptq.one_thread():
        codes, _ = gptq._columns(WT, prep.U, gptq.BLOCK, g, group_of, True, None, grids.Rounder(grid),
                                 grid.scale, grid.minv, prep.hdiag, torch.int16)
    if prep.perm is not None:
        codes = codes[:, torch.argsort(prep.perm)]
    return GridWeight(codes.contiguous(), grid)


def natural_type(fmt) -> Optional[str]:
    """The llama.cpp grid an artifact's weight is on as it is stored, or None."""
    for t in ("Q8_0", "Q4_0", "Q4_1"):
        if from_format(fmt, t) is not None:
            return t
    return None


def from_format(fmt, qtype: str) -> Optional[GridWeight]:
    """An artifact's weight as it is on llama.cpp's grid `qtype` (no rounding), or None when its
    format is not that grid (int8 group 32 = Q8_0, int4 sym / asym group 32 = Q4_0 / Q4_1)."""
    from ..kernels.formats import Int4Weight, Int8Weight

    def f16_exact(t):
        return t is not None and bool(torch.equal(t.to(torch.float16).to(torch.float32), t.to(torch.float32)))

    s = getattr(fmt, "scale", None)
    if getattr(fmt, "group_size", None) != 32 or not f16_exact(s):
        return None
    s = s.to(torch.float32)
    d = {"d": s.numpy().astype(np.float16)}
    if isinstance(fmt, Int8Weight) and qtype == "Q8_0":
        return GridWeight(fmt.q.to(torch.int16), grids.Grid("Q8_0", s, None, d))
    if isinstance(fmt, Int4Weight) and fmt.min is None and qtype == "Q4_0":
        return GridWeight(fmt.q.to(torch.int16), grids.Grid("Q4_0", s, None, d))
    if isinstance(fmt, Int4Weight) and fmt.min is not None and qtype == "Q4_1" and f16_exact(fmt.min):
        m = fmt.min.to(torch.float32)
        return GridWeight(fmt.q.to(torch.int16), grids.Grid("Q4_1", s, m, {**d, "m": m.numpy().astype(np.float16)}))
    return None


def calibrated(cfg, weights: dict, types: dict, ids: torch.Tensor, *, damp: float = 0.01, act_order: bool = True,
               batch: int = 8, progress: bool = False) -> dict:
    """GPTQ onto the grids of every decoder linear named in `types` (HF name -> grid), layer by layer
    with the layers before already on their grids (jisu.compress's sequential pipeline); returns
    HF name -> GridWeight. `weights` (float, HF form) are not modified."""
    from tqdm import tqdm

    from ..compress import gptq
    from ..compress.methods import LayerJob, group_layer
    from ..compress.observe import compression_model, embed_all, model_form

    out: dict = {}

    def quantize_group(ws, H, qtypes, step):
        prep = gptq.prepare(H, step.damp, step.act_order)
        return [gptq_on_grid(w, prep, t) for w, t in zip(ws, qtypes)]

    class Job(LayerJob):
        def record(self, name, spec, fmt, w_fp, H, extra=None):
            out[name] = fmt
            return fmt.dequantize()

    model = compression_model(cfg, model_form(cfg, dict(weights)))
    step = SimpleNamespace(damp=damp, act_order=act_order)
    X = embed_all(model, ids, batch)
    with torch.no_grad():
        for i in tqdm(range(cfg.num_layers), desc="gptq onto the grids", unit="layer",
                      disable=not progress, file=sys.stderr):
            group_layer(Job(model, {}, i, X, types, step, out, batch, quantize_group))
    return out
