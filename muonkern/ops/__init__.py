"""Torch custom ops of muonkern and their Python entry points."""
from __future__ import annotations

from typing import List, Sequence

import torch

from .ns5_args import check_ns5_options, resolve_coefficients
from .ns5_routing import Ns5Route, ns5_route
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
        eps: float = 1e-7, algorithm: str = "auto") -> torch.Tensor:
    """Quintic Newton-Schulz orthogonalization of every matrix in G (shape (..., m, n)).

    X = G / (||G||_F + eps) per matrix, then `steps` times: A = X X^T, B = b A + c A A,
    X = a X + B X, with one (a, b, c) triple per step (`coefficients`: flattened, a list of
    triples, "jordan" or "polar_express"; default KellerJordan/Muon's (3.4445, -4.7750, 2.0315)). Wide orientation is used internally
    (m > n works on the transpose; the Gram algorithm multiplies from the right instead). bf16 operands, fp32 accumulation; the result has G's
    dtype and shape and is contiguous.

    ``algorithm``: "standard" (the iteration above), "gram" (the same polynomial computed on the
    m×m Gram matrix X Xᵀ with restarts, fewer FLOPs for wide or tall matrices; see
    muonkern.ops.fallback.gram_iteration) or "auto" (gram where a FLOP cost model says it saves at
    least 25% on a large enough short side, muonkern.ops.ns5_args.choose_algorithm, and on CUDA also
    where the fused kernel's cost model says it is no slower; :func:`ns5_route` tells which path and algorithm a
    call takes).
    """
    return torch.ops.muonkern.ns5(G, steps, resolve_coefficients(coefficients, steps), eps, algorithm)


def ns5_grouped(Gs: Sequence[torch.Tensor], steps: int = 5, coefficients: Sequence[float] | None = None,
                eps: float = 1e-7, algorithm: str = "auto") -> List[torch.Tensor]:
    """:func:`ns5` of every tensor in ``Gs`` (shapes (..., m, n), any mix of shapes, dtypes and
    devices), with one ns5 launch per distinct shape (m×n and n×m share one unless the Gram
    algorithm runs them) and dtype: what an
    optimizer step needs. Returns new contiguous tensors, in order, each equal to ``ns5(G)``."""
    coeffs = resolve_coefficients(coefficients, steps)
    if len(Gs) == 0:  # the dispatcher cannot route a call without tensors; the options are checked
        check_ns5_options(steps, coeffs, eps, algorithm)
        return []
    return torch.ops.muonkern.ns5_grouped(list(Gs), steps, coeffs, eps, algorithm)


def dirquad(grads: Sequence[torch.Tensor], directions: Sequence[torch.Tensor],
            products: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """Every per-parameter dot product a directional-curvature probe needs, in one launch.

    For P parameter tensors, K directions and R product vectors per direction (e.g. Hessian-vector
    products; layout in muonkern/ops/dirquad_args.py) returns a float64 tensor (K, 2 + R, P):
    out[k, 0, p] = <g_p, u_kp>, out[k, 1, p] = <u_kp, u_kp> and out[k, 2 + r, p] = <u_kp, h_krp>,
    accumulated in float64 in a fixed order (deterministic).
    """
    if len(grads) == 0:  # the dispatcher cannot route a call without tensors: say what is wrong
        raise ValueError("dirquad: grads is empty (expected one tensor per parameter)")
    return torch.ops.muonkern.dirquad(list(grads), list(directions), list(products))


__all__ = ["Ns5Route", "backend", "dirquad", "ns5", "ns5_grouped", "ns5_route"]
