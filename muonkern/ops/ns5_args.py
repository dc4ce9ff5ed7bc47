"""Argument rules of muonkern::ns5, shared by the fallback and the fake kernel.

The C++ kernels apply the same rules (csrc/ns5_common.h) with the same messages, so a user sees
one error whichever backend runs.
"""
from __future__ import annotations

from typing import Sequence

import torch

# (a, b, c) of KellerJordan/Muon's quintic iteration: steep near zero, singular values land in ~[0.7, 1.2].
JORDAN_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def check_ns5_args(G: torch.Tensor, steps: int, coefficients: Sequence[float] | None, eps: float) -> None:
    if G.dim() < 2:
        raise ValueError(f"ns5: expected a tensor of rank >= 2 with shape (..., m, n), got shape {tuple(G.shape)}")
    if not G.dtype.is_floating_point:
        raise TypeError(f"ns5: expected a real floating-point tensor, got dtype {G.dtype}")
    if steps < 0:
        raise ValueError(f"ns5: steps must be >= 0, got {steps}")
    if coefficients is not None and len(coefficients) != 3 * steps:
        raise ValueError(
            f"ns5: coefficients must hold 3*steps = {3 * steps} values (one (a, b, c) triple per step), "
            f"got {len(coefficients)}")
    if not eps > 0:
        raise ValueError(f"ns5: eps must be positive (it keeps a zero matrix from dividing by zero), got {eps}")


def step_coefficients(steps: int, coefficients: Sequence[float] | None) -> list[tuple[float, float, float]]:
    """One (a, b, c) triple per step: the user's flattened list, or Jordan's triple repeated."""
    if coefficients is None:
        return [JORDAN_COEFFICIENTS] * steps
    return [tuple(coefficients[3 * i:3 * i + 3]) for i in range(steps)]
