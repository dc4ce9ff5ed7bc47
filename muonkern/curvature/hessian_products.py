"""Hessian-vector products: forward-over-reverse, reverse-over-reverse, finite differences.

All three share :func:`grad_and_hvps`, which hands the products for a list of vectors to a
callback, ``batch_size`` of them per pass (vmapped tangents for ``fwd_rev``, batched cotangents
for ``rev_rev``: the primal forward and backward are computed once per pass and shared), with
the gradient.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Dict, Iterator, List, Mapping, Sequence

import torch

from .validate import Params, check_like, check_params, check_scalar

__all__ = ["HVP_METHODS", "exact_attention", "finite_diff_step", "hvp"]

LossFn = Callable[[Dict[str, torch.Tensor]], torch.Tensor]
HVP_METHODS = ("fwd_rev", "rev_rev", "finite_diff")
EXACT_METHODS = ("fwd_rev", "rev_rev")

_EXACT_ATTENTION_WARNED = False


@contextlib.contextmanager
def exact_attention() -> Iterator[None]:
    """Run ``scaled_dot_product_attention`` on the math backend inside the block.

    Fused SDPA kernels (flash, memory-efficient, cuDNN) support neither forward-mode AD nor double
    backward, so exact Hessian-vector products through attention need the math path, an explicit
    softmax(QKᵀ/√d + mask)·V that is differentiable to any order. The exact methods of this package
    enter this context themselves. Warns once per process (``UserWarning``): the math path is
    slower and uses O(T²) memory per head. Nesting is allowed.
    """
    global _EXACT_ATTENTION_WARNED
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not _EXACT_ATTENTION_WARNED:
        _EXACT_ATTENTION_WARNED = True
        warnings.warn("muonkern exact curvature probes run attention on the math SDPA backend "
                      "(exact higher-order AD; slower, O(T^2) memory per head)",
                      UserWarning, stacklevel=3)
    with sdpa_kernel(SDPBackend.MATH):
        yield


def attention_for(method: str):
    """The attention context a method needs: math SDPA for the exact ones, unchanged otherwise."""
    return exact_attention() if method in EXACT_METHODS else contextlib.nullcontext()


def check_method(method: str) -> None:
    if method not in HVP_METHODS:
        raise ValueError(f"unknown hvp method {method!r}; expected one of {HVP_METHODS}")


def dot64(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Σ_k <a_k, b_k> accumulated in float64 (a 0-dim tensor)."""
    total = None
    for k in a:
        d = torch.dot(a[k].reshape(-1).double(), b[k].reshape(-1).double())
        total = d if total is None else total + d
    return total


def _norm(v: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(float(dot64(v, v)))


def zeros_like(params: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: torch.zeros_like(t) for k, t in params.items()}


def _leaves_and_grads(loss_fn: LossFn, params: Dict[str, torch.Tensor], create_graph: bool):
    """(leaf copies of params, their raw gradients: None where the loss does not use one)."""
    leaves = {k: t.detach().requires_grad_(True) for k, t in params.items()}
    with torch.enable_grad():
        loss = check_scalar(loss_fn(leaves))
        gs = (torch.autograd.grad(loss, list(leaves.values()), create_graph=create_graph,
                                  allow_unused=True)
              if loss.requires_grad else [None] * len(params))
    return leaves, gs


def _dense(params: Dict[str, torch.Tensor], gs) -> Dict[str, torch.Tensor]:
    return {k: (torch.zeros_like(params[k]) if g is None else g.detach()) for k, g in zip(params, gs)}


def gradient(loss_fn: LossFn, params: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Gradient by reverse mode; parameters the loss does not use get zeros."""
    return _dense(params, _leaves_and_grads(loss_fn, params, create_graph=False)[1])


def _stack(vs: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {k: torch.stack([v[k] for v in vs]) for k in vs[0]}


def _unstack(v: Dict[str, torch.Tensor], n: int) -> List[Dict[str, torch.Tensor]]:
    return [{k: t[i] for k, t in v.items()} for i in range(n)]


def _fwd_rev(loss_fn, params, vs):
    grad_fn = torch.func.grad(lambda q: check_scalar(loss_fn(q)))
    if len(vs) == 1:
        g, hv = torch.func.jvp(grad_fn, (params,), (vs[0],))
        return g, [hv]
    # The primal (forward and backward) is not batched: vmap computes it once for all tangents.
    g, hv = torch.func.vmap(lambda t: torch.func.jvp(grad_fn, (params,), (t,)),
                            out_dims=(None, 0))(_stack(vs))
    return g, _unstack(hv, len(vs))


class RevRevEngine:
    """Double backward: one forward and one differentiable backward, then H v = J_gᵀ v for each
    batch of cotangents v (H is symmetric); the graph is kept for any number of batches."""

    def __init__(self, loss_fn, params):
        self.params = params
        self.leaves, gs = _leaves_and_grads(loss_fn, params, create_graph=True)
        self.grad = _dense(params, gs)
        # Only gradients that depend on θ contribute to H v.
        self.live = [(k, g) for k, g in zip(params, gs) if g is not None and g.requires_grad]

    def products(self, vs):
        if not self.live:  # gradient constant in θ: H = 0
            return [zeros_like(self.params) for _ in vs]
        batched = len(vs) > 1
        cot = [torch.stack([v[k] for v in vs]) if batched else vs[0][k] for k, _ in self.live]
        with torch.enable_grad():
            hv = torch.autograd.grad([g for _, g in self.live], list(self.leaves.values()),
                                     grad_outputs=cot, retain_graph=True, allow_unused=True,
                                     is_grads_batched=batched)
        out = []
        for i in range(len(vs)):
            out.append({k: (torch.zeros_like(self.params[k]) if h is None
                            else (h[i] if batched else h).detach())
                        for k, h in zip(self.params, hv)})
        return out


def finite_diff_step(params: Params, v: Params) -> float:
    """Step h of the central difference (g(θ+hv) − g(θ−hv)) / 2h used by ``hvp``.

    h = cbrt(eps) · max(1, ‖θ‖) / ‖v‖, eps the machine epsilon of the narrowest parameter dtype
    (float32 or float64: with bfloat16 or float16 the step would be a fifth or a tenth of ‖θ‖,
    far outside the quadratic regime, so those raise ValueError).
    The step in parameter space, ‖hv‖ = cbrt(eps)·max(1, ‖θ‖), balances the truncation error
    O(‖hv‖²) of the central difference against the rounding error O(eps/‖hv‖) of the gradient
    difference; both are then O(eps^(2/3)) relative (≈ 4e-11 in float64, ≈ 2.5e-5 in float32,
    up to the size of third derivatives and the conditioning of the gradient).
    """
    params = check_params(params)
    return _step(_step_length(params), check_like(params, v, "v"))


def _step_length(params: Dict[str, torch.Tensor]) -> float:
    """‖hv‖ = cbrt(eps)·max(1, ‖θ‖): one per probe, whatever the vectors."""
    low = sorted({str(t.dtype) for t in params.values() if t.dtype not in (torch.float32, torch.float64)})
    if low:
        raise ValueError(f"method='finite_diff' needs float32 or float64 parameters, got {', '.join(low)}: "
                         "its step would leave the quadratic regime; use 'rev_rev' or 'fwd_rev'")
    eps = max(torch.finfo(t.dtype).eps for t in params.values())
    return eps ** (1.0 / 3.0) * max(1.0, _norm(params))


def _step(length: float, v: Dict[str, torch.Tensor]) -> float:
    vn = _norm(v)
    return 0.0 if vn == 0.0 else length / vn


def _finite_diff(loss_fn, params, v, length):
    """H v by the central difference of gradients with step length ``length``; 0 for v = 0."""
    h = _step(length, v)
    if h == 0.0:
        return zeros_like(params)
    plus = gradient(loss_fn, {k: t + h * v[k] for k, t in params.items()})
    minus = gradient(loss_fn, {k: t - h * v[k] for k, t in params.items()})
    return {k: (plus[k] - minus[k]) / (2.0 * h) for k in params}


def _is_zero_tensor_bug(e: RuntimeError) -> bool:
    # pytorch/pytorch#123996 (open in 2.14): forward-over-reverse through F.mse_loss(reduction=
    # "mean") fails with "ZeroTensors are immutable". Reverse-over-reverse is exact too.
    return "ZeroTensors are immutable" in str(e)


def grad_and_hvps(loss_fn: LossFn, params: Dict[str, torch.Tensor], count: int,
                  vector: Callable[[int], Dict[str, torch.Tensor]], method: str,
                  batch_size: int = 1, consume=None, need_grad: bool = True) -> None:
    """H v_i for i < count, ``batch_size`` vectors per pass, and the gradient, to ``consume``.

    ``vector(i)`` builds v_i on demand (checked, params order and dtypes) and ``consume(i0, vs,
    hvs, g)`` receives each pass's vectors, products and the gradient, so no more than one batch
    of them is held.
    Runs inside :func:`attention_for` ``(method)``. The gradient comes with the exact methods'
    first pass; ``finite_diff`` computes it apart (the mean of a pair of shifted gradients would
    save that pass but is off by O(‖hv‖²): percent-level in g·u in fp32 on a small GPT, where uᵀHu
    is within 1e-3). With ``need_grad=False`` a caller that ignores the gradient spares that pass:
    ``finite_diff`` then hands ``consume`` None.
    """
    with attention_for(method):
        # before any pass: _step_length refuses 16-bit parameters
        length = _step_length(params) if method == "finite_diff" else None
        if method == "rev_rev":
            engine = RevRevEngine(loss_fn, params)
            g = engine.grad
        elif need_grad and method == "finite_diff":
            g = gradient(loss_fn, params)
        else:
            g = None
        fwd_rev_broken = False
        for i0 in range(0, count, batch_size):
            vs = [vector(i) for i in range(i0, min(count, i0 + batch_size))]
            if method == "fwd_rev" and not fwd_rev_broken:
                try:
                    g_pass, hvs = _fwd_rev(loss_fn, params, vs)
                except RuntimeError as e:
                    if not _is_zero_tensor_bug(e):
                        raise
                    warnings.warn(
                        "hvp(method='fwd_rev') hit torch bug pytorch/pytorch#123996 (forward-mode "
                        "AD through F.mse_loss with reduction='mean'); falling back to the exact "
                        "'rev_rev' method", RuntimeWarning, stacklevel=3)
                    fwd_rev_broken = True
                    engine = RevRevEngine(loss_fn, params)
                    g = engine.grad
                else:
                    g = g if g is not None else {k: g_pass[k].detach() for k in params}
                    hvs = [{k: h[k].detach() for k in params} for h in hvs]
            if method == "rev_rev" or fwd_rev_broken:
                hvs = engine.products(vs)
            elif method == "finite_diff":
                hvs = [_finite_diff(loss_fn, params, v, length) for v in vs]
            if consume is not None:
                consume(i0, vs, hvs, g)


def hvp(loss_fn: LossFn, params: Params, v: Params, method: str = "fwd_rev"
        ) -> Dict[str, torch.Tensor]:
    """Hessian-vector product H v of ``loss_fn`` at ``params``, as a dict name -> tensor.

    method:
      * ``"fwd_rev"`` (default): ``torch.func.jvp`` of ``torch.func.grad``; exact, one
        forward-mode pass through the backward graph. ``loss_fn`` must be torch.func-compatible.
      * ``"rev_rev"``: double backward through ``torch.autograd.grad(create_graph=True)``; exact.
      * ``"finite_diff"``: central difference of gradients (g(θ+hv) − g(θ−hv)) / 2h with the step
        of :func:`finite_diff_step`; approximate (relative error ~ eps^(2/3)), and the only method
        that runs through fused attention kernels.

    The exact methods run attention on the math path (:func:`exact_attention`). ``v`` must have
    exactly the keys and shapes of ``params`` (ValueError otherwise); it is cast to each
    parameter's dtype and device. The result has the parameters' dtypes.
    """
    check_method(method)
    params = check_params(params)
    v = check_like(params, v, "v")
    result = []
    grad_and_hvps(loss_fn, params, 1, lambda i: v, method,
                  consume=lambda i0, vs, hvs, g: result.extend(hvs), need_grad=False)
    return result[0]
