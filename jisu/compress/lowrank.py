"""Low-rank error correction of a quantized linear (QERA / LQER style): the residual E = W - Q the
quantizer left, factored to rank r in the metric of the linear's calibration inputs, A B minimising
||(E - A B) X^T|| (closed form: truncated SVD of E S, S = H^(1/2) of the damped H = X^T X)."""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels.lowrank import Factors, LowRankWeight

_F64 = torch.float64
DAMP = 0.01   # fraction of mean(diag H) added to H's diagonal before its square root


class Whitening:
    """S = H^(1/2) and S^-1 of the damped H [K, K] (float64; linears that share H share one)."""

    def __init__(self, H: torch.Tensor, damp: float = DAMP):
        H = H.to(_F64)
        K = H.shape[0]
        mean = float(torch.diagonal(H).mean()) if K else 0.0
        H = H + max(damp * mean, 1e-12) * torch.eye(K, dtype=_F64)
        e, V = torch.linalg.eigh(H)
        e = e.clamp_min(max(damp * mean, 1e-12) * 1e-3)
        root = e.sqrt()
        self.H = H
        self.S = (V * root) @ V.T
        self.S_inv = (V / root) @ V.T


def factor(E: torch.Tensor, rank: int, white: Optional[Whitening] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float factors A [N, r], B [r, K] of E [N, K]: the best rank-r A B in ||(E - A B) S||_F
    (white given) or in the plain Frobenius norm (white None). A has orthonormal columns; the
    singular values go into B (per-row scales then absorb them when B is stored as int8)."""
    M = E.to(_F64)
    if white is not None:
        M = M @ white.S
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    r = min(rank, s.shape[0])
    A = U[:, :r]
    B = s[:r, None] * Vh[:r]
    if white is not None:
        B = B @ white.S_inv
    return A.to(torch.float32), B.to(torch.float32)


def refit_a(E: torch.Tensor, B: torch.Tensor, white: Whitening) -> torch.Tensor:
    """The A that minimises ||(E - A B) S|| for a fixed B (the stored, rounded one):
    A = E H B^T (B H B^T)^-1."""
    E, B = E.to(_F64), B.to(_F64)
    HB = white.H @ B.T                       # [K, r]
    G = B @ HB                               # [r, r]
    G = G + 1e-9 * float(torch.diagonal(G).mean().clamp_min(1e-30)) * torch.eye(G.shape[0], dtype=_F64)
    return torch.linalg.solve(G, (E @ HB).T).T.to(torch.float32)


def stored_factors(E: torch.Tensor, rank: int, white: Whitening) -> Factors:
    """int8 factors of E: B from the whitened SVD, rounded; A refit to the rounded B, rounded."""
    A, B = factor(E, rank, white)
    fb = Factors.quantize(A, B)
    A = refit_a(E, fb.B(), white)
    fa = Factors.quantize(A, fb.B())
    return Factors(fa.a, fa.a_scale, fb.b, fb.b_scale)


def correct(w: torch.Tensor, fmt, white: Whitening, rank: int) -> LowRankWeight:
    """fmt (the quantized w) with the int8 rank-`rank` correction of its residual."""
    E = w.to(torch.float32) - fmt.dequantize().to(torch.float32)
    return LowRankWeight(fmt, stored_factors(E, rank, white))


def correct_group(weights: list, fmts: list, H: torch.Tensor, rank: int, damp: float = DAMP) -> list:
    """correct() for linears that share the input statistics H (one whitening for all)."""
    white = Whitening(H, damp)
    return [correct(w, f, white, rank) for w, f in zip(weights, fmts)]


def error(E: torch.Tensor, H: torch.Tensor) -> float:
    """||E X^T||^2 / n up to H's scale: trace(E H E^T)."""
    E = E.to(_F64)
    return float(((E @ H.to(_F64)) * E).sum())

