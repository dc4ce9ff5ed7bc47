"""Second-order Taylor rules of the layers of :class:`muonkern.models.GPT`.

A :class:`Jet` holds x(0), x'(0), x''(0) of an activation along the curves θ(t) = θ + t·u_k of
K directions: ``x`` is the primal tensor (...), ``d`` and ``dd`` are (K, ...). A parameter W
moves as W + t·U (U: (K, *W.shape)), linearly, so its own second derivative is zero.

Rules (products of a moving weight and a moving input get the cross term 2·U·ẋ):

* linear y = x Wᵀ:       ẏ = ẋ Wᵀ + x Uᵀ,        ÿ = ẍ Wᵀ + 2 ẋ Uᵀ
* elementwise y = f(x):  ẏ = f'(x) ẋ,            ÿ = f''(x) ẋ² + f'(x) ẍ
* RMSNorm y = x·r·w, r = (mean(x²) + eps)^(−1/2), μ = mean(x²):
  μ̇ = mean(2 x ẋ), μ̈ = mean(2 ẋ² + 2 x ẍ), ṙ = −½ r³ μ̇, r̈ = ¾ r⁵ μ̇² − ½ r³ μ̈,
  n = x r, ṅ = ẋ r + x ṙ, n̈ = ẍ r + 2 ẋ ṙ + x r̈;  ẏ = ṅ w + n U,  ÿ = n̈ w + 2 ṅ U
* mean cross-entropy ℓ = mean_n (lse(z_n) − z_n[y_n]) with π = softmax(z_n):
  ℓ̇ = mean_n (⟨π, ż⟩ − ż[y]),  ℓ̈ = mean_n (⟨π, (ż − ⟨π, ż⟩)²⟩ + ⟨π, z̈⟩ − z̈[y])
"""
from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F

from ..models.gpt import apply_rope
from .attention import accumulation_dtype

__all__ = ["CrossEntropy", "Jet", "add_linear_", "embedding", "gelu", "linear", "linear_derivatives",
           "rmsnorm", "rope"]


class Jet(NamedTuple):
    """An activation and its first and second derivatives along K directions."""

    x: torch.Tensor     # (...)
    d: torch.Tensor     # (K, ...)
    dd: torch.Tensor    # (K, ...)


def _per_direction(U: torch.Tensor, ndim: int) -> torch.Tensor:
    """U (K, n) viewed as (K, 1, ..., 1, n) to broadcast against a (K, ..., n) tangent."""
    return U.reshape(U.shape[0], *([1] * (ndim - 2)), U.shape[-1])


def add_linear_(out: Jet, h: Jet, W: torch.Tensor, U: torch.Tensor) -> None:
    """out += linear(h, W, U), in place and without a temporary of out's size: a layer's
    contribution to the residual stream (callers may pass a slice of W's input columns)."""
    K, out_f, in_f = U.shape
    x, xd, xdd = h.x.reshape(-1, in_f), h.d.reshape(K, -1, in_f), h.dd.reshape(K, -1, in_f)
    N = x.shape[0]
    out.x.view(-1, out_f).addmm_(x, W.T)
    # ẏ = [ẋ, x]·[W, U_k]ᵀ and ÿ = [ẍ, 2ẋ]·[W, U_k]ᵀ: one product each over the joined inputs,
    # so out's derivatives are read and written once, not twice
    WU = torch.cat((W.expand(K, out_f, in_f), U), dim=2).transpose(1, 2)
    out.d.view(K, N, out_f).baddbmm_(torch.cat((xd, x.expand(K, N, in_f)), dim=2), WU)
    out.dd.view(K, N, out_f).baddbmm_(torch.cat((xdd, 2.0 * xd), dim=2), WU)


def embedding(idx: torch.Tensor, E: torch.Tensor, U: torch.Tensor) -> Jet:
    """Rows of E + t·U: x = E[idx], ẋ = U[:, idx], ẍ = 0."""
    d = U[:, idx]
    return Jet(F.embedding(idx, E), d, torch.zeros_like(d))


def linear_derivatives(x: torch.Tensor, xd: torch.Tensor, xdd: torch.Tensor, W: torch.Tensor,
                       U: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ẏ, ÿ) of y = x Wᵀ for x (N, in), ẋ and ẍ (K, N, in), W (out, in) moving as W + t·U,
    U (K, out, in); both (K, N, out)."""
    K, out_f, in_f = U.shape
    # x U_kᵀ for every k as one product with the K weights stacked: (N, K·out) -> (K, N, out)
    x_u = (x @ U.reshape(K * out_f, in_f).T).reshape(-1, K, out_f).transpose(0, 1)
    yd = torch.matmul(xd, W.T).add_(x_u)
    # 2·ẋ Uᵀ accumulated by the batched product itself: no temporary, no extra passes
    ydd = torch.baddbmm(torch.matmul(xdd, W.T), xd, U.transpose(1, 2), alpha=2.0)
    return yd, ydd


def linear(h: Jet, W: torch.Tensor, U: torch.Tensor) -> Jet:
    """y = x Wᵀ with W (out, in) moving as W + t·U, U (K, out, in); x (..., in)."""
    K, out_f, in_f = U.shape
    lead = h.x.shape[:-1]
    x = h.x.reshape(-1, in_f)
    yd, ydd = linear_derivatives(x, h.d.reshape(K, -1, in_f), h.dd.reshape(K, -1, in_f), W, U)
    return Jet((x @ W.T).reshape(*lead, out_f), yd.reshape(K, *lead, out_f),
               ydd.reshape(K, *lead, out_f))


def rmsnorm(h: Jet, w: torch.Tensor, U: torch.Tensor, eps: float) -> Jet:
    """y = x·(mean(x²) + eps)^(−1/2)·w over the last dim, w moving as w + t·U (U: (K, n)).

    Computed in at least float32, like the model's RMSNorm."""
    dt = accumulation_dtype(h.x.dtype)
    x, xd, xdd = h.x.to(dt), h.d.to(dt), h.dd.to(dt)
    mu = x.pow(2).mean(-1, keepdim=True)
    mud = 2.0 * (x * xd).mean(-1, keepdim=True)
    mudd = 2.0 * (xd * xd).addcmul_(x, xdd).mean(-1, keepdim=True)
    r = torch.rsqrt(mu + eps)
    r3 = r ** 3
    rd = -0.5 * r3 * mud
    rdd = 0.75 * r3 * r * r * mud * mud - 0.5 * r3 * mudd
    n = x * r
    nd = (x * rd).addcmul_(xd, r)
    ndd = (x * rdd).addcmul_(xd, rd, value=2.0).addcmul_(xdd, r)
    n, nd, ndd = n.to(h.x.dtype), nd.to(h.x.dtype), ndd.to(h.x.dtype)
    Uw = _per_direction(U, nd.dim())
    # in place, ÿ before ẏ (it reads ṅ): no (K, ...) temporaries beside the input's jet
    ndd.mul_(w).addcmul_(nd, Uw, value=2.0)
    nd.mul_(w).addcmul_(n, Uw)
    return Jet(n * w, nd, ndd)


def gelu(h: Jet) -> Jet:
    """GELU (erf form) f(x) = x Φ(x): f' = Φ + x φ, f'' = φ (2 − x²), φ the normal density."""
    x = h.x
    # in place where a temporary is no longer needed: these are the widest tensors of the model
    pdf = torch.exp(-0.5 * x * x).mul_(1.0 / math.sqrt(2.0 * math.pi))
    f1 = torch.erf(x * (1.0 / math.sqrt(2.0))).add_(1.0).mul_(0.5).addcmul_(x, pdf)   # Φ + xφ
    f2 = pdf.mul_(2.0 - x * x)
    dd = (h.d * h.d).mul_(f2).addcmul_(f1, h.dd)
    del f2
    return Jet(F.gelu(x), f1 * h.d, dd)


def rope(h: Jet, cos: torch.Tensor, sin: torch.Tensor) -> Jet:
    """Rotary embedding: a fixed linear map, applied to each order."""
    return Jet(apply_rope(h.x, cos, sin), apply_rope(h.d, cos, sin), apply_rope(h.dd, cos, sin))


class CrossEntropy:
    """Mean cross-entropy of logits z (N, V) against ``target`` (N,), rows with ``ignore_index``
    left out (as ``F.cross_entropy``): the primal terms (loss, softmax) once, then the
    derivatives of any number of chunks of directions. Row terms are computed in float32
    (float64 for float64 logits) and summed in float64."""

    def __init__(self, z: torch.Tensor, target: torch.Tensor, ignore_index: int = -100):
        self.acc = accumulation_dtype(z.dtype)
        zx = z.to(self.acc)
        valid = target != ignore_index
        # NaN when every row is ignored, as torch
        self.weight = valid.to(torch.float64) / valid.sum().to(torch.float64)
        self.target = torch.where(valid, target, 0)[:, None]
        lse = torch.logsumexp(zx, dim=-1)
        self.loss = ((lse - zx.gather(-1, self.target)[:, 0]).double() * self.weight).sum()
        self.pi = torch.softmax(zx, dim=-1)

    def derivatives(self, zd: torch.Tensor, zdd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(ℓ̇, ℓ̈), each (K,) float64, for logit derivatives zd, zdd (K, N, V)."""
        pi, tgt = self.pi, self.target.expand(zd.shape[0], -1, -1)
        zd, zdd = zd.to(self.acc), zdd.to(self.acc)
        mean_d = (pi * zd).sum(-1)                                                  # (K, N)
        first_rows = mean_d - zd.gather(-1, tgt)[..., 0]
        var_d = (pi * (zd - mean_d[..., None]).pow(2)).sum(-1)
        second_rows = var_d + (pi * zdd).sum(-1) - zdd.gather(-1, tgt)[..., 0]
        return (first_rows.double() * self.weight).sum(-1), (second_rows.double() * self.weight).sum(-1)
