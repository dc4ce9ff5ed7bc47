"""The reference the benchmarks time: KellerJordan/Muon's Newton-Schulz iteration as it is written
(bf16 operands through `@`, the default (a, b, c) at every step), batched over leading dims. On a GPU
it runs the ATen ops of the package's fallback (muonkern.ops.fallback.ns5_reference), without its
argument checks; on CPU the fallback and the CPU kernel run these bf16 GEMMs as fp32 GEMMs of the
bf16 values (README, *CPU*), and this is what they are timed against."""
from __future__ import annotations

import torch

from muonkern.ops.ns5_args import JORDAN_COEFFICIENTS


def reference_ns5(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    a, b, c = JORDAN_COEFFICIENTS
    X = G.bfloat16()
    X = X / (torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) + eps)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype).contiguous()
