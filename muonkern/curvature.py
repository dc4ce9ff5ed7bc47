"""Curvature probes along directions: Hessian-vector products and directional quadratics.

Functional API in the ``torch.func`` style: ``params`` is a dict ``name -> tensor`` and
``loss_fn(params)`` returns a scalar loss. An ``nn.Module`` is adapted with
``torch.func.functional_call``::

    params = {k: p.detach() for k, p in model.named_parameters()}
    loss_fn = lambda p: F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

Definitions. For parameters θ, loss L,
gradient g = ∇L(θ), Hessian H = ∇²L(θ) and a direction u (for the study: the update
Δ = θ_next − θ an optimizer takes):

* first-order gain ``g·u``;
* curvature ``uᵀHu`` (the second-order Taylor penalty is ½uᵀHu), so the predicted change of the
  loss along u is ``g·u + ½uᵀHu`` (compare with the actual ``L(θ+u) − L(θ)``);
* ``‖u‖²`` and the normalized directional sharpness ``NDS = uᵀHu / ‖u‖²``;
* with parameter groups a, b (tensors, modules or blocks) and u_a the part of u in group a,
  the block matrix ``M_ab = u_aᵀ H_ab u_b``; ``within = Σ_a M_aa``, ``cross = Σ_{a≠b} M_ab``,
  and ``uᵀHu = within + cross``. M is symmetric because H is.

Functions:

* :func:`hvp` — H v by forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``, exact),
  reverse-over-reverse (double backward, exact) or central finite differences of gradients.
* :func:`directional_quadratics` — all the quantities above for one or several directions, the
  blocks exactly with G HVPs per direction (G = number of groups).
* :func:`within_estimate` — an unbiased estimate of ``within`` from random-sign combinations of
  the group parts (K HVPs instead of G), with its standard error.
* :func:`groups_by_module` — parameter groups from the module structure of parameter names.
* :func:`top_eigenvalues` (Lanczos) and :func:`hessian_trace` (Hutchinson) on the same HVPs.

All reductions (dot products, norms, blocks, estimates) are accumulated in float64 and returned as
float64 tensors on the parameters' device; the HVPs themselves run in the parameters' dtype.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "DirectionalQuadratics",
    "directional_quadratics",
    "finite_diff_step",
    "groups_by_module",
    "hessian_trace",
    "hvp",
    "top_eigenvalues",
    "within_estimate",
]

Params = Mapping[str, torch.Tensor]
LossFn = Callable[[Dict[str, torch.Tensor]], torch.Tensor]
HVP_METHODS = ("fwd_rev", "rev_rev", "finite_diff")


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------

def _check_params(params: Params) -> Dict[str, torch.Tensor]:
    """Return a detached, ordered copy of ``params`` after checking names, types and dtypes."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict name -> tensor, got {type(params).__name__}")
    if len(params) == 0:
        raise ValueError("params is empty")
    out: Dict[str, torch.Tensor] = {}
    device = None
    for name, t in params.items():
        if not isinstance(name, str):
            raise TypeError(f"parameter names must be str, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"params[{name!r}] is a {type(t).__name__}, not a tensor")
        if not t.is_floating_point():
            raise TypeError(
                f"params[{name!r}] has dtype {t.dtype}; curvature needs real floating-point "
                "parameters")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(
                f"all parameters must be on one device; params[{name!r}] is on {t.device}, "
                f"others on {device}")
        out[name] = t.detach()
    return out


def _check_like(params: Dict[str, torch.Tensor], v: Params, what: str) -> Dict[str, torch.Tensor]:
    """Check that ``v`` has exactly the keys and shapes of ``params``; return it in params order,
    in each parameter's dtype and device."""
    if not isinstance(v, Mapping):
        raise TypeError(f"{what} must be a dict name -> tensor, got {type(v).__name__}")
    missing = [k for k in params if k not in v]
    extra = [k for k in v if k not in params]
    if missing or extra:
        raise ValueError(
            f"{what} keys must match params keys: missing {missing}, unexpected {extra}")
    out = {}
    for name, p in params.items():
        t = v[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{name!r}] is a {type(t).__name__}, not a tensor")
        if t.shape != p.shape:
            raise ValueError(
                f"{what}[{name!r}] has shape {tuple(t.shape)}, params[{name!r}] has "
                f"{tuple(p.shape)}")
        if t.is_complex():
            raise TypeError(f"{what}[{name!r}] is complex; only real directions are supported")
        out[name] = t.detach().to(dtype=p.dtype, device=p.device)
    return out


def _check_scalar(loss: torch.Tensor) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn(params) must return a scalar tensor")
    return loss.reshape(())


def _resolve_groups(params: Dict[str, torch.Tensor],
                    groups: Optional[Mapping[str, Sequence[str]]]) -> Dict[str, List[str]]:
    """groups=None: one group per tensor, in params order. Otherwise every parameter must be in
    exactly one non-empty group."""
    if groups is None:
        return {name: [name] for name in params}
    if not isinstance(groups, Mapping):
        raise TypeError(f"groups must be a dict group name -> list of parameter names, "
                        f"got {type(groups).__name__}")
    if len(groups) == 0:
        raise ValueError("groups is empty")
    owner: Dict[str, str] = {}
    out: Dict[str, List[str]] = {}
    for gname, members in groups.items():
        if isinstance(members, str) or not isinstance(members, Sequence):
            raise TypeError(f"groups[{gname!r}] must be a list of parameter names, "
                            f"got {members!r}")
        if len(members) == 0:
            raise ValueError(f"group {gname!r} is empty")
        for m in members:
            if m not in params:
                raise ValueError(f"group {gname!r} names {m!r}, which is not in params")
            if m in owner:
                raise ValueError(f"parameter {m!r} is in more than one group "
                                 f"({owner[m]!r} and {gname!r})")
            owner[m] = gname
        out[str(gname)] = list(members)
    missing = [k for k in params if k not in owner]
    if missing:
        raise ValueError(f"parameters in no group: {missing}")
    return out


def _dot64(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
           names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Σ_k <a_k, b_k> over ``names`` (default: all keys of a), accumulated in float64."""
    names = list(a) if names is None else names
    total = None
    for k in names:
        d = torch.dot(a[k].reshape(-1).double(), b[k].reshape(-1).double())
        total = d if total is None else total + d
    return total


def _norm(v: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(float(_dot64(v, v)))


def _grad(loss_fn: LossFn, params: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Gradient by reverse mode; parameters the loss does not use get zeros."""
    p = {k: t.detach().requires_grad_(True) for k, t in params.items()}
    with torch.enable_grad():
        loss = _check_scalar(loss_fn(p))
        if not loss.requires_grad:
            return {k: torch.zeros_like(t) for k, t in params.items()}
        gs = torch.autograd.grad(loss, list(p.values()), allow_unused=True)
    return {k: (torch.zeros_like(params[k]) if g is None else g.detach())
            for k, g in zip(p, gs)}


# --------------------------------------------------------------------------------------------
# Hessian-vector products
# --------------------------------------------------------------------------------------------

def _hvp_fwd_rev(loss_fn, params, v):
    def grad_fn(p):
        return torch.func.grad(lambda q: _check_scalar(loss_fn(q)))(p)
    try:
        _, hv = torch.func.jvp(grad_fn, (params,), (v,))
    except RuntimeError as e:
        # torch bug pytorch/pytorch#123996 (open in 2.14): forward-over-reverse through
        # F.mse_loss(reduction="mean") fails with "ZeroTensors are immutable". Reverse-over-reverse
        # is exact too, so use it and say so once.
        if "ZeroTensors are immutable" not in str(e):
            raise
        warnings.warn(
            "hvp(method='fwd_rev') hit torch bug pytorch/pytorch#123996 (forward-mode AD through "
            "F.mse_loss with reduction='mean'); falling back to the exact 'rev_rev' method",
            RuntimeWarning, stacklevel=3)
        return _hvp_rev_rev(loss_fn, params, v)
    return {k: hv[k].detach() for k in params}


def _hvp_rev_rev(loss_fn, params, v):
    p = {k: t.detach().requires_grad_(True) for k, t in params.items()}
    with torch.enable_grad():
        loss = _check_scalar(loss_fn(p))
        if not loss.requires_grad:  # constant loss: H = 0
            return {k: torch.zeros_like(t) for k, t in params.items()}
        gs = torch.autograd.grad(loss, list(p.values()), create_graph=True, allow_unused=True)
        # d/dθ (g(θ)·v) = H v; v is a constant of the graph.
        terms = [(g * v[k]).sum() for k, g in zip(p, gs) if g is not None]
        dot = torch.stack(terms).sum() if terms else None
        if dot is None or not dot.requires_grad:  # gradient constant in θ: H = 0
            return {k: torch.zeros_like(t) for k, t in params.items()}
        hv = torch.autograd.grad(dot, list(p.values()), allow_unused=True)
    return {k: (torch.zeros_like(params[k]) if h is None else h.detach())
            for k, h in zip(p, hv)}


def finite_diff_step(params: Params, v: Params) -> float:
    """Step h of the central difference (g(θ+hv) − g(θ−hv)) / 2h used by ``hvp``.

    h = cbrt(eps) · max(1, ‖θ‖) / ‖v‖, eps the machine epsilon of the widest parameter dtype.
    The step in parameter space, ‖hv‖ = cbrt(eps)·max(1, ‖θ‖), balances the truncation error
    O(‖hv‖²) of the central difference against the rounding error O(eps/‖hv‖) of the gradient
    difference; both are then O(eps^(2/3)) relative (≈ 4e-11 in float64, ≈ 2.5e-5 in float32,
    up to the size of third derivatives and the conditioning of the gradient).
    """
    params = _check_params(params)
    v = _check_like(params, v, "v")
    eps = max(torch.finfo(t.dtype).eps for t in params.values())
    vn = _norm(v)
    if vn == 0.0:
        return 0.0
    return eps ** (1.0 / 3.0) * max(1.0, _norm(params)) / vn


def _hvp_finite_diff(loss_fn, params, v):
    h = finite_diff_step(params, v)
    if h == 0.0:  # v = 0
        return {k: torch.zeros_like(t) for k, t in params.items()}
    plus = _grad(loss_fn, {k: t + h * v[k] for k, t in params.items()})
    minus = _grad(loss_fn, {k: t - h * v[k] for k, t in params.items()})
    return {k: (plus[k] - minus[k]) / (2.0 * h) for k in params}


def _hvp_checked(loss_fn, params, v, method):
    if method == "fwd_rev":
        return _hvp_fwd_rev(loss_fn, params, v)
    if method == "rev_rev":
        return _hvp_rev_rev(loss_fn, params, v)
    if method == "finite_diff":
        return _hvp_finite_diff(loss_fn, params, v)
    raise ValueError(f"unknown hvp method {method!r}; expected one of {HVP_METHODS}")


def _check_method(method: str) -> None:
    if method not in HVP_METHODS:
        raise ValueError(f"unknown hvp method {method!r}; expected one of {HVP_METHODS}")


def hvp(loss_fn: LossFn, params: Params, v: Params, method: str = "fwd_rev"
        ) -> Dict[str, torch.Tensor]:
    """Hessian-vector product H v of ``loss_fn`` at ``params``, as a dict name -> tensor.

    method:
      * ``"fwd_rev"`` (default): ``torch.func.jvp`` of ``torch.func.grad``; exact, one
        forward-mode pass through the backward graph. ``loss_fn`` must be torch.func-compatible.
      * ``"rev_rev"``: double backward through ``torch.autograd.grad(create_graph=True)``; exact.
      * ``"finite_diff"``: central difference of gradients (g(θ+hv) − g(θ−hv)) / 2h with the step
        of :func:`finite_diff_step`; approximate (relative error ~ eps^(2/3)).

    ``v`` must have exactly the keys and shapes of ``params`` (ValueError otherwise); it is cast to
    each parameter's dtype and device. The result has the parameters' dtypes.
    """
    _check_method(method)
    params = _check_params(params)
    v = _check_like(params, v, "v")
    return _hvp_checked(loss_fn, params, v, method)


# --------------------------------------------------------------------------------------------
# directional quadratics
# --------------------------------------------------------------------------------------------

@dataclass
class DirectionalQuadratics:
    """Second-order quantities along direction(s) u; see the module docstring.

    With one direction the tensors are 0-dim and ``blocks`` is (G, G); with a list of K
    directions they get a leading dimension K: (K,) and (K, G, G). All float64.
    ``blocks[..., a, b] = u_aᵀ H_ab u_b`` with groups ordered as ``group_names``.
    """

    gain: torch.Tensor        # g·u
    curvature: torch.Tensor   # uᵀHu = blocks.sum((-2, -1)) = within + cross
    norm_sq: torch.Tensor     # ‖u‖²
    nds: torch.Tensor         # curvature / norm_sq (nan where u = 0)
    blocks: torch.Tensor      # M_ab
    within: torch.Tensor      # Σ_a M_aa
    cross: torch.Tensor       # Σ_{a≠b} M_ab
    group_names: List[str]

    @property
    def predicted_change(self) -> torch.Tensor:
        """Second-order Taylor prediction of L(θ+u) − L(θ): g·u + ½uᵀHu."""
        return self.gain + 0.5 * self.curvature


def _restrict(u: Dict[str, torch.Tensor], names: Sequence[str]) -> Dict[str, torch.Tensor]:
    keep = set(names)
    return {k: (t if k in keep else torch.zeros_like(t)) for k, t in u.items()}


def _as_direction_list(params, directions) -> Tuple[List[Dict[str, torch.Tensor]], bool]:
    if isinstance(directions, Mapping):
        return [_check_like(params, directions, "direction")], True
    if isinstance(directions, (list, tuple)):
        if len(directions) == 0:
            raise ValueError("directions is an empty list")
        return [_check_like(params, d, f"directions[{i}]") for i, d in enumerate(directions)], False
    raise TypeError("directions must be a dict name -> tensor or a list of such dicts, "
                    f"got {type(directions).__name__}")


def directional_quadratics(loss_fn: LossFn, params: Params,
                           directions: Union[Params, Sequence[Params]],
                           groups: Optional[Mapping[str, Sequence[str]]] = None,
                           method: str = "fwd_rev") -> DirectionalQuadratics:
    """Gain, curvature, ‖u‖², NDS and the group block matrix M_ab = u_aᵀ H_ab u_b along u.

    ``directions``: one dict (scalar fields) or a list of K dicts (fields with a leading dim K).
    ``groups``: None for one group per parameter tensor (params order), or a dict group name ->
    list of parameter names with every parameter in exactly one group (see
    :func:`groups_by_module`). Cost per direction: G HVPs (one per group b, with u restricted to
    group b; dotting H u_b with u_a restricted to each group a gives column b of M) plus one
    gradient shared by all directions.
    """
    _check_method(method)
    params = _check_params(params)
    dirs, single = _as_direction_list(params, directions)
    grouping = _resolve_groups(params, groups)
    names = list(grouping)
    G = len(names)
    device = next(iter(params.values())).device

    g = _grad(loss_fn, params)
    gains, norms, blocks = [], [], []
    for u in dirs:
        gains.append(_dot64(g, u))
        norms.append(_dot64(u, u))
        M = torch.zeros(G, G, dtype=torch.float64, device=device)
        for b, gb in enumerate(names):
            hub = _hvp_checked(loss_fn, params, _restrict(u, grouping[gb]), method)
            for a, ga in enumerate(names):
                M[a, b] = _dot64(u, hub, grouping[ga])
        blocks.append(M)

    gain = torch.stack(gains)
    norm_sq = torch.stack(norms)
    blocks_t = torch.stack(blocks)
    curvature = blocks_t.sum(dim=(-2, -1))
    within = torch.diagonal(blocks_t, dim1=-2, dim2=-1).sum(-1)
    cross = curvature - within
    nds = curvature / norm_sq
    if single:
        gain, curvature, norm_sq, nds, blocks_t, within, cross = (
            t[0] for t in (gain, curvature, norm_sq, nds, blocks_t, within, cross))
    return DirectionalQuadratics(gain=gain, curvature=curvature, norm_sq=norm_sq, nds=nds,
                                 blocks=blocks_t, within=within, cross=cross, group_names=names)


def groups_by_module(model: Union[torch.nn.Module, Params], depth: int) -> Dict[str, List[str]]:
    """Group parameter names by their first ``depth`` dot-separated components.

    depth=1 puts "layers.0.attn.weight" in group "layers", depth=2 in "layers.0". Names with
    fewer components than ``depth`` form their own group (their full name). ``model`` may be an
    ``nn.Module`` (its ``named_parameters()``) or a params dict. Groups keep first-seen order.
    """
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"depth must be an int >= 1, got {depth!r}")
    if isinstance(model, torch.nn.Module):
        names = [n for n, _ in model.named_parameters()]
    elif isinstance(model, Mapping):
        names = list(model)
    else:
        raise TypeError(f"model must be an nn.Module or a params dict, got {type(model).__name__}")
    if not names:
        raise ValueError("model has no parameters")
    out: Dict[str, List[str]] = {}
    for n in names:
        out.setdefault(".".join(n.split(".")[:depth]), []).append(n)
    return out


# --------------------------------------------------------------------------------------------
# stochastic estimators
# --------------------------------------------------------------------------------------------

def _rademacher(n: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """n signs ±1 (float64, CPU) from ``generator``, or the default CPU generator."""
    return torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64).double() * 2 - 1


def _mean_se(values: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack(values)
    return x.mean(), x.std(unbiased=True) / math.sqrt(x.numel())


def _check_samples(samples: int) -> None:
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 2:
        raise ValueError(f"samples must be an int >= 2 (for a standard error), got {samples!r}")


def within_estimate(loss_fn: LossFn, params: Params, direction: Params,
                    groups: Optional[Mapping[str, Sequence[str]]], samples: int,
                    generator: Optional[torch.Generator] = None, method: str = "fwd_rev"
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unbiased estimate of within = Σ_a u_aᵀ H_aa u_a and its standard error.

    For Rademacher signs s ∈ {±1}^G, w = Σ_a s_a u_a gives wᵀHw = Σ_ab s_a s_b M_ab, and
    E[s_a s_b] = δ_ab, so E[wᵀHw] = Σ_a M_aa. Returns (mean, std/sqrt(samples)) over ``samples``
    draws (one HVP each), as float64 0-dim tensors. Its variance is 2·Σ_{a≠b} M_ab² / samples:
    cheaper than the exact G HVPs of :func:`directional_quadratics` when G is large and the
    cross blocks are small. ``groups`` as in :func:`directional_quadratics` (None: per tensor).
    """
    _check_method(method)
    _check_samples(samples)
    params = _check_params(params)
    u = _check_like(params, direction, "direction")
    grouping = _resolve_groups(params, groups)
    group_of = {p: i for i, members in enumerate(grouping.values()) for p in members}
    vals = []
    for _ in range(samples):
        s = _rademacher(len(grouping), generator).tolist()
        w = {k: t * s[group_of[k]] for k, t in u.items()}
        vals.append(_dot64(w, _hvp_checked(loss_fn, params, w, method)))
    return _mean_se(vals)


def hessian_trace(loss_fn: LossFn, params: Params, samples: int,
                  generator: Optional[torch.Generator] = None, method: str = "fwd_rev"
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hutchinson estimate of tr(H): mean of vᵀHv over ``samples`` Rademacher vectors v, and its
    standard error std/sqrt(samples); float64 0-dim tensors. Variance per sample is
    2·Σ_{i≠j} H_ij²."""
    _check_method(method)
    _check_samples(samples)
    params = _check_params(params)
    vals = []
    for _ in range(samples):
        v = {k: _rademacher(t.numel(), generator).reshape(t.shape).to(t.device, t.dtype)
             for k, t in params.items()}
        vals.append(_dot64(v, _hvp_checked(loss_fn, params, v, method)))
    return _mean_se(vals)


# --------------------------------------------------------------------------------------------
# extreme eigenvalues
# --------------------------------------------------------------------------------------------

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
    _check_method(method)
    if which not in ("LA", "LM"):
        raise ValueError(f"which must be 'LA' or 'LM', got {which!r}")
    params = _check_params(params)
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

    def matvec(flat: torch.Tensor) -> torch.Tensor:
        hv = _hvp_checked(loss_fn, params, to_dict(flat), method)
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
    if idx is None or evals is None or evals.numel() < k:
        raise RuntimeError("Lanczos produced fewer Ritz values than k")  # pragma: no cover
    idx = select(evals)
    values = evals[idx].to(device)
    if not return_eigenvectors:
        return values
    basis = torch.stack(V)  # (m, n)
    vecs = []
    for i in idx.tolist():
        x = evecs[:, i].to(device) @ basis
        vecs.append(to_dict(x / x.norm()))
    return values, vecs
