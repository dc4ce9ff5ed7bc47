"""Inputs and the error measure shared by the Taylor-attention tests on CPU and CUDA."""
from __future__ import annotations

import torch

F64 = torch.float64


def attention_inputs(gen, K, B, H, T, D, dtype=F64, device="cpu"):
    """q, k, v (B, H, T, D) and six derivative tensors (K, B, H, T, D), Gaussian (drawn in
    float64 on the CPU generator, then cast and moved)."""
    prim = [torch.randn(B, H, T, D, generator=gen, dtype=F64) for _ in range(3)]
    tan = [torch.randn(K, B, H, T, D, generator=gen, dtype=F64) for _ in range(6)]
    return tuple(t.to(device, dtype) for t in (*prim, *tan))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|, in float64."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max())
