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
  reverse-over-reverse (double backward, exact) or central finite differences of gradients
  (module :mod:`.hessian_products`). The exact methods run attention on the math path
  (:func:`exact_attention`), since fused SDPA kernels support neither forward-mode AD nor double
  backward; ``finite_diff`` keeps the fused kernels.
* :func:`directional_quadratics` — all the quantities above for one or several directions, the
  blocks exactly with G HVPs per direction (G = number of groups), ``batch_size`` HVPs per pass;
  its dot products run in one ``muonkern::dirquad`` launch per pass (module :mod:`.quadratics`).
  :func:`directional_quadratics_for_partitions` gives the blocks of several partitions at once,
  from one primal pass and one gradient.
* :func:`within_estimate` — an unbiased estimate of ``within`` from random-sign combinations of
  the group parts (K HVPs instead of G), with its standard error.
* :func:`groups_by_module` — parameter groups from the module structure of parameter names.
* :func:`top_eigenvalues` (Lanczos) and :func:`hessian_trace` (Hutchinson) on the same HVPs
  (module :mod:`.spectrum`).

All reductions (dot products, norms, blocks, estimates) are accumulated in float64 and returned as
float64 tensors on the parameters' device; the HVPs themselves run in the parameters' dtype.
"""
from .hessian_products import HVP_METHODS, exact_attention, finite_diff_step, hvp
from .quadratics import (QUADRATIC_METHODS, DirectionalQuadratics, directional_quadratics,
                         directional_quadratics_for_partitions, groups_by_module, within_estimate)
from .spectrum import hessian_trace, top_eigenvalues

__all__ = [
    "DirectionalQuadratics",
    "HVP_METHODS",
    "QUADRATIC_METHODS",
    "directional_quadratics",
    "directional_quadratics_for_partitions",
    "exact_attention",
    "finite_diff_step",
    "groups_by_module",
    "hessian_trace",
    "hvp",
    "top_eigenvalues",
    "within_estimate",
]
