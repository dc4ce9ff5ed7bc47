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
from .attention import accumulation_dtype, triton_requested

__all__ = ["CrossEntropy", "Jet", "add_linear_", "embedding", "gelu_", "linear", "linear_derivatives",
           "rmsnorm", "rope", "rope_heads", "split_heads", "triton_layers_apply"]


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
    contribution to the residual stream (callers may pass a slice of W's input columns; out's
    derivatives may be strided views, e.g. a chunk of token rows)."""
    K, out_f, in_f = U.shape
    x, xd, xdd = h.x.reshape(-1, in_f), h.d.reshape(K, -1, in_f), h.dd.reshape(K, -1, in_f)
    N = x.shape[0]
    od, odd = out.d.view(K, N, out_f), out.dd.view(K, N, out_f)
    out.x.view(-1, out_f).addmm_(x, W.T)
    Wt = W.T.expand(K, in_f, out_f)
    if 2 * in_f < out_f:
        # narrow inputs (one group of heads): ẏ = [ẋ, x]·[W, U_k]ᵀ and ÿ = [ẍ, 2ẋ]·[W, U_k]ᵀ, one
        # product each over the joined inputs, so out's derivatives are read and written once
        WU = torch.cat((Wt, U.transpose(1, 2)), dim=1)
        od.baddbmm_(torch.cat((xd, x.expand(K, N, in_f)), dim=2), WU)
        odd.baddbmm_(torch.cat((xdd, 2.0 * xd), dim=2), WU)
    else:
        # wide inputs (the MLP's hidden layer): joining them would copy more than a second pass
        # over out's derivatives moves
        od.baddbmm_(xd, Wt).baddbmm_(x.expand(K, N, in_f), U.transpose(1, 2))
        odd.baddbmm_(xdd, Wt).baddbmm_(xd, U.transpose(1, 2), alpha=2.0)


def embedding(idx: torch.Tensor, E: torch.Tensor, U: torch.Tensor) -> Jet:
    """Rows of E + t·U: x = E[idx], ẋ = U[:, idx], ẍ = 0."""
    d = U[:, idx]
    return Jet(F.embedding(idx, E), d, torch.zeros_like(d))


def linear_derivatives(x: torch.Tensor, xd: torch.Tensor, xdd: torch.Tensor, W: torch.Tensor,
                       U: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ẏ, ÿ) of y = x Wᵀ for x (N, in), ẋ and ẍ (K, N, in), W (out, in) moving as W + t·U,
    U (K, out, in); both (K, N, out)."""
    K, out_f, in_f = U.shape
    # the cross terms accumulate into the products' outputs: no temporaries beside ẏ and ÿ
    yd = torch.matmul(xd, W.T).baddbmm_(x.expand(K, *x.shape), U.transpose(1, 2))
    ydd = torch.matmul(xdd, W.T).baddbmm_(xd, U.transpose(1, 2), alpha=2.0)
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
    if triton_layers_apply(h.x):
        from .triton_layers import rmsnorm_jet
        return Jet(*rmsnorm_jet(h.x, h.d, h.dd, w, U, eps))
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


def gelu_(h: Jet) -> Jet:
    """GELU (erf form) f(x) = x Φ(x), in place on the jet (the widest tensors of the model, so no
    copies): f' = Φ + x φ, f'' = φ (2 − x²), φ the normal density."""
    if triton_layers_apply(h.x) and h.x.is_contiguous() and h.d.is_contiguous() \
            and h.dd.is_contiguous():
        from .triton_layers import gelu_jet_
        gelu_jet_(h.x, h.d, h.dd)
        return h
    x = h.x
    pdf = torch.exp(-0.5 * x * x).mul_(1.0 / math.sqrt(2.0 * math.pi))
    cdf = torch.erf(x * (1.0 / math.sqrt(2.0))).add_(1.0).mul_(0.5)
    f1 = torch.addcmul(cdf, x, pdf)                                      # Φ + xφ
    f2 = pdf.mul_(2.0 - x * x)
    h.dd.mul_(f1).addcmul_(h.d * h.d, f2)
    h.d.mul_(f1)
    x.mul_(cdf)
    return h


def rope(h: Jet, cos: torch.Tensor, sin: torch.Tensor) -> Jet:
    """Rotary embedding: a fixed linear map, applied to each order."""
    return Jet(apply_rope(h.x, cos, sin), apply_rope(h.d, cos, sin), apply_rope(h.dd, cos, sin))


def split_heads(h: Jet, n_head: int) -> Jet:
    """(…, T, C) -> contiguous (…, H, T, C/H), each order: the Taylor attention's layout."""
    def split(t):
        *lead, T, C = t.shape
        return t.reshape(*lead, T, n_head, C // n_head).transpose(-3, -2).contiguous()
    return Jet(split(h.x), split(h.d), split(h.dd))


def rope_heads(h: Jet, n_head: int, cos: torch.Tensor, sin: torch.Tensor) -> Jet:
    """split_heads, then the rotary embedding: one pass per order where the Triton kernel runs."""
    D = h.x.shape[-1] // n_head
    if triton_layers_apply(h.x) and D >= 2 and D & (D - 1) == 0:
        from .triton_layers import rope_heads_jet
        return Jet(*rope_heads_jet(h.x, h.d, h.dd, n_head, cos, sin))
    return rope(split_heads(h, n_head), cos, sin)


def triton_layers_apply(x: torch.Tensor) -> bool:
    """Whether the Triton kernels of :mod:`muonkern.taylor.triton_layers` run for jets like x:
    CUDA tensors where triton is installed, unless ``MUONKERN_TAYLOR_LAYERS=torch`` (read at
    every call) asks for the PyTorch rules."""
    return triton_requested(x, "MUONKERN_TAYLOR_LAYERS", ("auto", "torch"), off="torch")


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
