"""Second-order Taylor-mode curvature: φ'(0) = g·u and φ''(0) = uᵀHu of φ(t) = L(θ + t·u) for
several directions u in one forward pass, no backward.

Importing this package registers ``torch.ops.muonkern.taylor_attention``.

* :func:`taylor_attention` — causal softmax attention with first and second derivatives.
* :func:`taylor_directional` — (loss, g·u_k, u_kᵀHu_k) of a :class:`muonkern.models.GPT`.
"""
from .attention import taylor_attention, taylor_attention_blocked, taylor_attention_dense
from .registration import register as _register

_register()

from .gpt import taylor_directional  # noqa: E402

__all__ = ["taylor_attention", "taylor_attention_blocked", "taylor_attention_dense",
           "taylor_directional"]
