"""Spectral quantities of the Hessian on the same HVPs: Hutchinson traces, extreme eigenvalues."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .hessian_products import LossFn, RevRevEngine, attention_for, check_method, grad_and_hvps
from .quadratics import mean_and_se, quadratic_forms, rademacher
from .validate import Params, check_batch_size, check_params, check_samples

__all__ = ["hessian_trace", "top_eigenvalues"]


def hessian_trace(loss_fn: LossFn, params: Params, samples: int,
                  generator: Optional[torch.Generator] = None, method: str = "fwd_rev",
                  batch_size: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hutchinson estimate of tr(H): mean of vᵀHv over ``samples`` Rademacher vectors v, and its
    standard error std/sqrt(samples); float64 0-dim tensors. Variance per sample is
    2·Σ_{i≠j} H_ij²."""
    check_method(method)
    check_samples(samples)
    check_batch_size(batch_size)
    params = check_params(params)

    def probe(i):  # built on demand, in order (the same draws as building them all first)
        return {k: rademacher(t.numel(), generator).reshape(t.shape).to(t.device, t.dtype)
                for k, t in params.items()}
    return mean_and_se(quadratic_forms(loss_fn, params, samples, probe, method, batch_size))


def top_eigenvalues(loss_fn: LossFn, params: Params, k: int = 1, iters: int = 100,
                    tol: float = 1e-6, generator: Optional[torch.Generator] = None,
                    which: str = "LA", method: str = "fwd_rev",
                    return_eigenvectors: bool = False):
    """The k extreme eigenvalues of H by Lanczos with full reorthogonalization.

    which="LA" (default): the k largest algebraic eigenvalues, in descending order.
    which="LM": the k of largest magnitude, in descending order of |λ| (PyHessian's power
    iteration targets these).

    Runs at most ``iters`` Lanczos steps (capped at the number of parameters n), one HVP each,
    and stops when every wanted Ritz value θ has residual ‖Hx − θx‖ = |β_j y_j| ≤ tol·max(1, |θ|).
    With n ≤ iters it reaches an invariant subspace and the values are exact up to rounding; if
    the Krylov space closes early (exactly repeated eigenvalues, low rank) it restarts with a
    fresh random vector orthogonal to the basis, so multiplicities are found. Like any
    single-vector Krylov method it can still stop (by ``tol``) before it has found every copy of
    a cluster of nearly equal eigenvalues when n > iters. Memory: the basis holds up to ``iters`` float64 copies of the
    parameters. Returns a float64 tensor (k,), and with ``return_eigenvectors`` also a list of k
    unit-norm Ritz vectors as dicts name -> tensor (parameter dtypes).
    """
    check_method(method)
    if which not in ("LA", "LM"):
        raise ValueError(f"which must be 'LA' or 'LM', got {which!r}")
    params = check_params(params)
    n = sum(t.numel() for t in params.values())
    if not isinstance(k, int) or k < 1 or k > n:
        raise ValueError(f"k must be an int in [1, {n}] (the number of parameters), got {k!r}")
    if not isinstance(iters, int) or iters < k:
        raise ValueError(f"iters must be an int >= k={k}, got {iters!r}")
    m_max = min(iters, n)
    device = next(iter(params.values())).device
    names = list(params)
    sizes = [params[x].numel() for x in names]

    def to_dict(flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {x: c.reshape(params[x].shape).to(params[x].dtype)
                for x, c in zip(names, flat.split(sizes))}

    # rev_rev: one forward and differentiable backward for the whole run, not one per step
    if method == "rev_rev":
        with attention_for(method):
            engine = RevRevEngine(loss_fn, params)

    def matvec(flat: torch.Tensor) -> torch.Tensor:
        if method == "rev_rev":
            hv = engine.products([to_dict(flat)])[0]
        else:
            out = []
            grad_and_hvps(loss_fn, params, 1, lambda i: to_dict(flat), method,
                          consume=lambda i0, vs, hvs, g: out.append(hvs[0]), need_grad=False)
            hv = out[0]
        return torch.cat([hv[x].reshape(-1).double() for x in names])

    def fresh(V: List[torch.Tensor]) -> Optional[torch.Tensor]:
        # random unit vector orthogonal to the basis (two Gram-Schmidt passes)
        for _ in range(5):
            q = torch.randn(n, generator=generator, dtype=torch.float64).to(device)
            for _ in range(2):
                for b in V:
                    q = q - torch.dot(b, q) * b
            nq = q.norm()
            if nq > 1e-8:
                return q / nq
        return None

    def select(evals: torch.Tensor) -> torch.Tensor:
        key = evals if which == "LA" else evals.abs()
        return torch.argsort(key, descending=True)[:k]

    V: List[torch.Tensor] = []
    alphas: List[float] = []
    betas: List[float] = []   # betas[j] couples V[j] and V[j+1]
    q = fresh(V)
    evals = evecs = idx = None
    while q is not None and len(V) < m_max:
        V.append(q)
        w = matvec(q)
        alpha = float(torch.dot(q, w))
        alphas.append(alpha)
        # full reorthogonalization (twice) against the whole basis
        for _ in range(2):
            for b in V:
                w = w - torch.dot(b, w) * b
        beta = float(w.norm())
        j = len(V)
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if j > 1:
            off = torch.tensor(betas, dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        idx = select(evals) if j >= k else None
        scale = max(1.0, max(abs(a) for a in alphas))
        if beta <= 1e-10 * scale:
            # Invariant subspace: every Ritz value is exact, but copies of repeated eigenvalues
            # may be missing, so restart orthogonally (T decouples, coupling 0) rather than stop.
            q = fresh(V) if j < m_max else None
            betas.append(0.0)
            continue
        if idx is not None:
            resid = (beta * evecs[-1, idx]).abs()
            if bool((resid <= tol * evals[idx].abs().clamp(min=1.0)).all()):
                break
        q = w / beta
        betas.append(beta)
    if idx is None:
        raise RuntimeError("Lanczos produced fewer Ritz values than k")  # pragma: no cover
    values = evals[idx].to(device)
    if not return_eigenvectors:
        return values
    basis = torch.stack(V)  # (m, n)
    vecs = []
    for i in idx.tolist():
        x = evecs[:, i].to(device) @ basis
        vecs.append(to_dict(x / x.norm()))
    return values, vecs
