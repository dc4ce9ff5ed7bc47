"""Directional quadratics: gain, curvature, ‖u‖², NDS and the group block matrix along directions.

The Hessian-vector products come from :mod:`.hessian_products`; every dot product the probe needs (g·u_k,
‖u_kp‖², u_kp·(H v)_p per parameter tensor p) is computed by one ``muonkern::dirquad`` launch per
batch of products, and reduced to groups with a one-hot matrix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..checks import check_positive_int
from ..ops import dirquad
from .hessian_products import HVP_METHODS, LossFn, check_method, grad_and_hvps
from .validate import (Params, check_batch_size, check_like, check_params, check_samples,
                       direction_list, resolve_groups)

__all__ = ["DirectionalQuadratics", "QUADRATIC_METHODS", "directional_quadratics",
           "directional_quadratics_for_partitions", "groups_by_module", "within_estimate"]

# "taylor": second-order Taylor mode through muonkern.models.GPT (muonkern.taylor), no HVP
QUADRATIC_METHODS = HVP_METHODS + ("taylor",)


@dataclass
class DirectionalQuadratics:
    """Second-order quantities along direction(s) u; see :mod:`muonkern.curvature`.

    With one direction the tensors are 0-dim and ``blocks`` is (G, G); with a list of K
    directions they get a leading dimension K: (K,) and (K, G, G). All float64.
    ``blocks[..., a, b] = u_aᵀ H_ab u_b`` with groups ordered as ``group_names``. With
    ``blocks=False`` the probe skips the group split: ``blocks``, ``within`` and ``cross`` are None
    and ``group_names`` is empty.
    """

    gain: torch.Tensor                # g·u
    curvature: torch.Tensor           # uᵀHu = blocks.sum((-2, -1)) = within + cross
    norm_sq: torch.Tensor             # ‖u‖²
    nds: torch.Tensor                 # curvature / norm_sq (nan where u = 0)
    blocks: Optional[torch.Tensor]    # M_ab
    within: Optional[torch.Tensor]    # Σ_a M_aa
    cross: Optional[torch.Tensor]     # Σ_{a≠b} M_ab
    group_names: List[str]

    @property
    def predicted_change(self) -> torch.Tensor:
        """Second-order Taylor prediction of L(θ+u) − L(θ): g·u + ½uᵀHu."""
        return self.gain + 0.5 * self.curvature


def _restrict(u: Dict[str, torch.Tensor], names: Sequence[str]) -> Dict[str, torch.Tensor]:
    keep = set(names)
    return {k: (t if k in keep else torch.zeros_like(t)) for k, t in u.items()}


def directional_quadratics(loss_fn: LossFn, params: Params,
                           directions: Union[Params, Sequence[Params]],
                           groups: Optional[Mapping[str, Sequence[str]]] = None,
                           method: str = "fwd_rev", blocks: bool = True,
                           batch_size: int = 1) -> DirectionalQuadratics:
    """Gain, curvature, ‖u‖², NDS and the group block matrix M_ab = u_aᵀ H_ab u_b along u.

    ``directions``: one dict (scalar fields) or a list of K dicts (fields with a leading dim K).
    ``groups``: None for one group per parameter tensor (params order), or a dict group name ->
    list of parameter names with every parameter in exactly one group (see
    :func:`groups_by_module`). ``blocks=False`` skips the split (one HVP per direction).
    ``method``: an HVP method (see :func:`muonkern.curvature.hvp`), or ``"taylor"`` for a
    :func:`muonkern.models.gpt_loss_fn` loss: second-order Taylor mode through the GPT
    (:mod:`muonkern.taylor`), one forward pass per ``batch_size`` vectors, no backward, no T×T
    attention matrix; with blocks it takes G(G+1)/2 vectors per direction (polarization).

    Cost: G HVPs per direction with blocks (one per group b, with u restricted to group b; dotting
    H u_b with u_a restricted to each group a gives column b of M), one without; the gradient comes
    with the first pass of products (``finite_diff`` computes it apart; ``taylor`` needs none).
    ``batch_size`` HVPs run per pass (memory grows with it; on a GPU 4–8 amortize the shared
    primal computation).
    """
    params, dirs, single = _checked(params, directions, method, batch_size)
    if method == "taylor":
        return _taylor_quadratics(loss_fn, params, dirs, single, groups, blocks, batch_size)
    return _hvp_quadratics(loss_fn, params, dirs, single, [groups] if blocks else [], method, batch_size)[0]


def directional_quadratics_for_partitions(loss_fn: LossFn, params: Params,
                                          directions: Union[Params, Sequence[Params]],
                                          partitions: Mapping[str, Optional[Mapping[str, Sequence[str]]]],
                                          method: str = "fwd_rev",
                                          batch_size: int = 1) -> Dict[str, DirectionalQuadratics]:
    """:func:`directional_quadratics` with blocks for several partitions of the parameters at once
    (``partitions``: name -> groups, as ``groups`` there): {name: its DirectionalQuadratics}.

    The HVP methods take the sum of the partitions' group counts in HVPs per direction, as separate
    calls do. ``rev_rev`` and ``finite_diff`` share one primal computation and one gradient among
    all partitions (one forward and one backward fewer per extra partition); ``fwd_rev``, which
    runs the forward in each of its passes, packs all partitions' HVPs into shared passes of
    ``batch_size`` (fewer passes where the partitions' counts leave passes partly filled);
    ``taylor`` runs one call per partition."""
    if not isinstance(partitions, Mapping) or len(partitions) == 0:
        raise ValueError("partitions must be a non-empty dict name -> groups")
    params, dirs, single = _checked(params, directions, method, batch_size)
    if method == "taylor":
        return {name: _taylor_quadratics(loss_fn, params, dirs, single, groups, True, batch_size)
                for name, groups in partitions.items()}
    results = _hvp_quadratics(loss_fn, params, dirs, single, list(partitions.values()), method, batch_size)
    return dict(zip(partitions, results))


def _checked(params, directions, method: str, batch_size: int):
    """(checked params, list of checked directions, whether one dict was given)."""
    if method not in QUADRATIC_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {QUADRATIC_METHODS}")
    check_batch_size(batch_size)
    params = check_params(params)
    return (params, *direction_list(params, directions))


def _hvp_quadratics(loss_fn, params, dirs, single, partitions: list, method: str,
                    batch_size: int) -> List[DirectionalQuadratics]:
    """One DirectionalQuadratics per partition (groups or None), all from one pass of products
    (H v for v = u restricted to every group of every partition); no partition: no blocks."""
    names = list(params)
    resolved, parts = [], []   # per partition: (grouping, first part, count)
    for groups in partitions:
        grouping, group_parts = _group_parts(params, groups)
        resolved.append((grouping, len(parts), len(group_parts)))
        parts += group_parts
    if not partitions:
        parts = [lambda u: u]
    K, R, P = len(dirs), len(parts), len(names)
    device = next(iter(params.values())).device

    D = torch.empty(K, R, P, dtype=torch.float64, device=device)
    firsts = torch.empty(K, 2, P, dtype=torch.float64, device=device)   # g·u_kp, ‖u_kp‖²

    def consume(i0, vs, hvs, g):
        # product i belongs to direction i // R and part i % R: row i of D viewed as (K*R, P)
        rows = range(i0, i0 + len(vs))
        us = [t for i in rows for t in dirs[i // R].values()]
        products = [t for hv in hvs for t in hv.values()]
        out = dirquad([g[k] for k in names], us, products)    # (len(vs), 3, P)
        D.view(K * R, P)[i0:i0 + len(vs)] = out[:, 2]
        for j, i in enumerate(rows):
            if i % R == 0:   # every direction's first part passes here once
                firsts[i // R] = out[j, :2]

    grad_and_hvps(loss_fn, params, K * R, lambda i: parts[i % R](dirs[i // R]), method,
                  batch_size, consume=consume)

    gain = firsts[:, 0].sum(-1)
    norm_sq = firsts[:, 1].sum(-1)
    if not partitions:
        return [_result(gain, norm_sq, D[:, 0].sum(-1), None, single, [])]
    index = {k: i for i, k in enumerate(names)}
    results = []
    for grouping, first, count in resolved:
        member = torch.zeros(P, count, dtype=torch.float64)     # one-hot: parameter p in group a
        for a, members in enumerate(grouping.values()):
            for m in members:
                member[index[m], a] = 1.0
        # M[k, a, b] = Σ_{p ∈ a} D[k, b, p]
        M = (D[:, first:first + count] @ member.to(device)).transpose(-1, -2)
        results.append(_result(gain, norm_sq, None, M, single, list(grouping)))
    return results


def _result(gain, norm_sq, curvature, M, single, group_names) -> DirectionalQuadratics:
    """Fields from per-direction gain, ‖u‖², curvature and blocks (None without blocks)."""
    within = cross = None
    if M is not None:
        curvature = M.sum(dim=(-2, -1))
        within = torch.diagonal(M, dim1=-2, dim2=-1).sum(-1)
        cross = curvature - within
    nds = curvature / norm_sq
    if single:
        gain, curvature, norm_sq, nds = gain[0], curvature[0], norm_sq[0], nds[0]
        if M is not None:
            M, within, cross = M[0], within[0], cross[0]
    return DirectionalQuadratics(gain=gain, curvature=curvature, norm_sq=norm_sq, nds=nds,
                                 blocks=M, within=within, cross=cross, group_names=group_names)


def _taylor_quadratics(loss_fn, params, dirs, single, groups, blocks, batch_size):
    """method="taylor": φ''(0) of φ(t) = L(θ + t·v) by one Taylor-mode forward pass per
    ``batch_size`` vectors v. Without blocks v = u. With blocks, M_aa from v = u_a and the cross
    blocks by polarization, M_ab = ½(φ''(u_a + u_b) − M_aa − M_bb): G(G+1)/2 vectors per direction
    (the subtraction loses the digits M_ab lacks against M_aa + M_bb; prefer float64 for small
    cross blocks)."""
    from ..models.gpt import GPTLoss
    from ..taylor.gpt import check_taylor_args, taylor_forward

    if not isinstance(loss_fn, GPTLoss):
        raise ValueError("method='taylor' needs loss_fn = muonkern.models.gpt_loss_fn(model, x, y) "
                         f"(Taylor mode runs through the GPT's layers), got {type(loss_fn).__name__}")
    model, x, y = loss_fn.model, loss_fn.x, loss_fn.y
    P = check_taylor_args(model, params, x, y)    # once, not per pass
    names = list(params)
    K = len(dirs)
    device = next(iter(params.values())).device
    norm_sq = dirquad([dirs[0][k] for k in names], [t for u in dirs for t in u.values()])[:, 1].sum(-1)
    if blocks:
        grouping, parts = _group_parts(params, groups)
        G = len(parts)
        pairs = [(a, a) for a in range(G)] + [(a, b) for a in range(G) for b in range(a + 1, G)]

        def vector(i):
            u = dirs[i // len(pairs)]
            a, b = pairs[i % len(pairs)]
            return parts[a](u) if a == b else _add(parts[a](u), parts[b](u))
        count = K * len(pairs)
    else:
        count = K

        def vector(i):
            return dirs[i]
    firsts, seconds = [], []
    for i0 in range(0, count, batch_size):
        _, first, second = taylor_forward(model, P, x, y,
                                          [vector(i) for i in range(i0, min(count, i0 + batch_size))])
        firsts.append(first)
        seconds.append(second)
    first = torch.cat(firsts).to(device)
    second = torch.cat(seconds).to(device)
    if not blocks:
        return _result(first, norm_sq, second, None, single, [])
    first, second = first.view(K, len(pairs)), second.view(K, len(pairs))
    M = torch.zeros(K, G, G, dtype=torch.float64, device=device)
    for a in range(G):                               # pairs[a] = (a, a)
        M[:, a, a] = second[:, a]
    for j, (a, b) in enumerate(pairs[G:], start=G):
        M[:, a, b] = M[:, b, a] = 0.5 * (second[:, j] - M[:, a, a] - M[:, b, b])
    gain = first[:, :G].sum(-1)                      # g·u = Σ_a g·u_a
    return _result(gain, norm_sq, None, M, single, list(grouping))


def _group_parts(params, groups):
    """The grouping (name -> members) and, per group, u ↦ u restricted to the group."""
    grouping = resolve_groups(params, groups)
    return grouping, [lambda u, members=members: _restrict(u, members) for members in grouping.values()]


def _add(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: a[k] + b[k] for k in a}


def groups_by_module(model: Union[torch.nn.Module, Params], depth: int) -> Dict[str, List[str]]:
    """Group parameter names by their first ``depth`` dot-separated components.

    depth=1 puts "layers.0.attn.weight" in group "layers", depth=2 in "layers.0". Names with
    fewer components than ``depth`` form their own group (their full name). ``model`` may be an
    ``nn.Module`` (its ``named_parameters()``) or a params dict. Groups keep first-seen order.
    """
    check_positive_int(depth, "depth")
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


def rademacher(n: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """n signs ±1 (float64, CPU) from ``generator``, or the default CPU generator."""
    return torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64).double() * 2 - 1


def quadratic_forms(loss_fn: LossFn, params: Dict[str, torch.Tensor], count: int, vector,
                    method: str, batch_size: int) -> torch.Tensor:
    """(count,) float64: v_iᵀ H v_i for v_i = vector(i) (built once, in order)."""
    names = list(params)
    values: List[torch.Tensor] = []

    def consume(i0, vs, hvs, g):
        out = dirquad([vs[0][k] for k in names], [t for v in vs for t in v.values()],
                      [t for hv in hvs for t in hv.values()])     # (len(vs), 3, P)
        values.extend(out[:, 2].sum(-1).unbind(0))

    grad_and_hvps(loss_fn, params, count, vector, method, batch_size, consume=consume,
                  need_grad=False)
    return torch.stack(values)


def mean_and_se(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return x.mean(), x.std(unbiased=True) / math.sqrt(x.numel())


def within_estimate(loss_fn: LossFn, params: Params, direction: Params,
                    groups: Optional[Mapping[str, Sequence[str]]], samples: int,
                    generator: Optional[torch.Generator] = None, method: str = "fwd_rev",
                    batch_size: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unbiased estimate of within = Σ_a u_aᵀ H_aa u_a and its standard error.

    For Rademacher signs s ∈ {±1}^G, w = Σ_a s_a u_a gives wᵀHw = Σ_ab s_a s_b M_ab, and
    E[s_a s_b] = δ_ab, so E[wᵀHw] = Σ_a M_aa. Returns (mean, std/sqrt(samples)) over ``samples``
    draws (one HVP each), as float64 0-dim tensors. Its variance is 2·Σ_{a≠b} M_ab² / samples:
    cheaper than the exact G HVPs of :func:`directional_quadratics` when G is large and the
    cross blocks are small. ``groups`` as in :func:`directional_quadratics` (None: per tensor).
    """
    check_method(method)
    check_samples(samples)
    check_batch_size(batch_size)
    params = check_params(params)
    u = check_like(params, direction, "direction")
    grouping = resolve_groups(params, groups)
    group_of = {p: i for i, members in enumerate(grouping.values()) for p in members}
    signs = [rademacher(len(grouping), generator).tolist() for _ in range(samples)]
    values = quadratic_forms(
        loss_fn, params, samples,
        lambda i: {k: t * signs[i][group_of[k]] for k, t in u.items()}, method, batch_size)
    return mean_and_se(values)
