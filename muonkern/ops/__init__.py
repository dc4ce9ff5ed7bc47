"""Torch custom ops of muonkern and their Python entry points."""
from __future__ import annotations

from typing import Sequence

import torch

from .registration import register

_BACKEND = register()


def backend() -> str:
    """Which implementation serves torch.ops.muonkern.*:

    "cuda"     compiled extension with our CUDA kernels (and the C++ CPU kernels),
    "cpu"      compiled extension built without CUDA (CUDA tensors use the fallback),
    "fallback" pure PyTorch (no extension, or MUONKERN_FORCE_FALLBACK=1).
    """
    return _BACKEND


def ns5(G: torch.Tensor, steps: int = 5, coefficients: Sequence[float] | None = None,
        eps: float = 1e-7) -> torch.Tensor:
    """Quintic Newton-Schulz orthogonalization of every matrix in G (shape (..., m, n)).

    X = G / (||G||_F + eps) per matrix, then `steps` times: A = X X^T, B = b A + c A A,
    X = a X + B X, with one (a, b, c) triple per step (`coefficients`, flattened; default
    KellerJordan/Muon's (3.4445, -4.7750, 2.0315)). Wide orientation is used internally
    (m > n works on the transpose). bf16 operands, fp32 accumulation; the result has G's
    dtype and shape and is contiguous.
    """
    coeffs = None if coefficients is None else [float(c) for c in coefficients]
    return torch.ops.muonkern.ns5(G, steps, coeffs, eps)


__all__ = ["backend", "ns5"]
