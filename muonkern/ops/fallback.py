"""Pure-PyTorch implementations of muonkern's ops.

`ns5_reference` is the reference iteration itself (KellerJordan/Muon's zeropower_via_newtonschulz5,
batched over leading dims, with per-step coefficients); `dirquad_reference` the per-parameter dot
products of the curvature probes. They run on any device and are what `torch.ops.muonkern.*`
executes when the compiled extension is absent.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from .dirquad_args import dirquad_sizes
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


def dirquad_reference(grads: List[torch.Tensor], directions: List[torch.Tensor],
                      products: List[torch.Tensor]) -> torch.Tensor:
    K, R, P = dirquad_sizes(grads, directions, products)
    out = torch.empty((K, 2 + R, P), dtype=torch.float64, device=grads[0].device)
    for k in range(K):
        for p in range(P):
            u = directions[k * P + p].reshape(-1).double()
            others = [grads[p], directions[k * P + p]]
            others += [products[(k * R + r) * P + p] for r in range(R)]
            for c, other in enumerate(others):
                out[k, c, p] = torch.dot(u, other.reshape(-1).double())
    return out
