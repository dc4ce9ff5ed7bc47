"""Pure-PyTorch implementations of muonkern's ops.

`ns5_reference` is the reference iteration itself (KellerJordan/Muon's zeropower_via_newtonschulz5,
batched over leading dims, with per-step coefficients). It runs on any device and is what
`torch.ops.muonkern.ns5` executes when the compiled extension is absent.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .ns5_args import check_ns5_args, step_coefficients


def ns5_reference(G: torch.Tensor, steps: int = 5, coefficients: Sequence[float] | None = None,
                  eps: float = 1e-7) -> torch.Tensor:
    check_ns5_args(G, steps, coefficients, eps)
    X = G.bfloat16()
    X = X / (torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) + eps)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    for a, b, c in step_coefficients(steps, coefficients):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype).contiguous()
