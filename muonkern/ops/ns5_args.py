"""Argument rules of muonkern::ns5, shared by the fallback and the fake kernel.

The C++ kernels apply the same rules (csrc/ns5_common.h) with the same messages, so a user sees
one error whichever backend runs.
"""
from __future__ import annotations

from typing import Sequence

import torch

# (a, b, c) of KellerJordan/Muon's quintic iteration: steep near zero, singular values land in ~[0.7, 1.2].
JORDAN_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


# Polar Express (Amsel et al. 2025): one triple per step, for 5 steps, as used by modded-nanogpt.
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def resolve_coefficients(coefficients, steps: int) -> list[float] | None:
    """The flattened per-step list ns5 takes, from a preset name ("jordan", "polar_express"), a list
    of (a, b, c) triples, or a flat list of 3*steps numbers. None means Jordan's default."""
    if coefficients is None or coefficients == "jordan":
        return None
    if coefficients == "polar_express":
        if steps != len(POLAR_EXPRESS_COEFFICIENTS):
            raise ValueError(f"the polar_express schedule has {len(POLAR_EXPRESS_COEFFICIENTS)} steps, got steps={steps}")
        return [c for triple in POLAR_EXPRESS_COEFFICIENTS for c in triple]
    if isinstance(coefficients, str):
        raise ValueError(f"unknown coefficient preset {coefficients!r}: use 'jordan', 'polar_express' or a list")
    flat = [float(c) for item in coefficients for c in (item if isinstance(item, (tuple, list)) else (item,))]
    if len(flat) != 3 * steps:
        raise ValueError(f"coefficients must hold 3*steps = {3 * steps} values, got {len(flat)}")
    return flat


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
