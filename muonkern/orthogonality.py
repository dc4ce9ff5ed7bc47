"""How far an orthogonalization is from the exact result: the measures of the coefficient table
(bench/ns5_coefficients.py), the anchors' accuracy table and the tests, in float64.

    polar = polar_factor(G)               # U Vᵀ of G's thin SVD
    polar_distance(ns5(G), polar)         # ‖X − U Vᵀ‖_F / ‖U Vᵀ‖_F per matrix
    singular_value_error(ns5(G))          # max |σ(X) − 1| per matrix
    ill_conditioned((256, 1024), gen)     # a test input with singular values 1 .. 1e-4
"""
from __future__ import annotations

import math

import torch

__all__ = ["ill_conditioned", "polar_distance", "polar_factor", "singular_value_error"]


def polar_factor(G: torch.Tensor) -> torch.Tensor:
    """U Vᵀ of the thin SVD of every matrix of G (…, m, n), in float64 on G's device."""
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


def polar_distance(X: torch.Tensor, polar: torch.Tensor) -> torch.Tensor:
    """‖X − polar‖_F / ‖polar‖_F per matrix (float64, X's batch shape), polar from `polar_factor`."""
    X = X.to(device=polar.device, dtype=torch.float64)
    return torch.linalg.vector_norm(X - polar, dim=(-2, -1)) / torch.linalg.vector_norm(polar, dim=(-2, -1))


def singular_value_error(X: torch.Tensor) -> torch.Tensor:
    """max |σ − 1| over the singular values of every matrix of X (float64, X's batch shape)."""
    return (torch.linalg.svdvals(X.double()) - 1).abs().amax(dim=-1)


def ill_conditioned(shape, generator: torch.Generator, smallest: float = 1e-4) -> torch.Tensor:
    """float64 U diag(σ) Vᵀ on the CPU, σ log-spaced from 1 down to `smallest`, with U and V the
    singular vectors of a Gaussian matrix drawn from `generator` (so the same draws as a Gaussian
    input of this shape)."""
    U, _, Vh = torch.linalg.svd(torch.randn(*shape, generator=generator, dtype=torch.float64), full_matrices=False)
    sigma = torch.logspace(0, math.log10(smallest), min(shape[-2:]), dtype=torch.float64)
    return U @ torch.diag_embed(sigma) @ Vh
