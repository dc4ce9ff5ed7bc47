"""Argument rules of muonkern::dirquad, shared by the fallback and the fake kernel.

The C++ kernels apply the same rules (csrc/dirquad.h) with the same messages.

Layout: P = len(grads) parameter tensors; ``directions`` holds K directions of P tensors each
(direction k's tensor p at index k*P + p); ``products`` holds R vectors per direction (typically
Hessian-vector products), vector r of direction k at index (k*R + r)*P + p. Tensor p of every list
has grads[p]'s shape and dtype; every tensor is on grads[0]'s device.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from .ns5_args import KERNEL_DTYPES


def dirquad_sizes(grads: Sequence[torch.Tensor], directions: Sequence[torch.Tensor],
                  products: Sequence[torch.Tensor]) -> Tuple[int, int, int]:
    """Checks the arguments; returns (K, R, P)."""
    P = len(grads)
    if P == 0:
        raise ValueError("dirquad: grads is empty (expected one tensor per parameter)")
    if len(directions) == 0 or len(directions) % P:
        raise ValueError(
            f"dirquad: len(directions) must be a positive multiple of len(grads) = {P} "
            f"(K directions of {P} tensors each), got {len(directions)}")
    K = len(directions) // P
    if len(products) % (K * P):
        raise ValueError(
            f"dirquad: len(products) must be a multiple of K*len(grads) = {K * P} "
            f"(R products per direction), got {len(products)}")
    device = grads[0].device
    for name, tensors in (("grads", grads), ("directions", directions), ("products", products)):
        for i, t in enumerate(tensors):
            p = i % P
            ref = grads[p]
            if t.dtype not in KERNEL_DTYPES:
                raise TypeError(f"dirquad: {name}[{i}] has dtype {t.dtype}; expected a real "
                                "floating-point tensor (float16, bfloat16, float32 or float64)")
            if t.dtype != ref.dtype:
                raise TypeError(f"dirquad: {name}[{i}] has dtype {t.dtype}, grads[{p}] has dtype "
                                f"{ref.dtype}; the tensors of one parameter must share a dtype")
            if t.shape != ref.shape:
                raise ValueError(f"dirquad: {name}[{i}] has shape {tuple(t.shape)}, grads[{p}] has "
                                 f"shape {tuple(ref.shape)}")
            if t.device != device:
                raise ValueError(f"dirquad: {name}[{i}] is on {t.device}, grads[0] is on {device}")
    return K, len(products) // (K * P), P
