"""Triton kernels for the elementwise and row-wise Taylor rules of :mod:`muonkern.taylor.layers`.

Each rule reads an activation's jet (x, ẋ_k, ẍ_k for K directions) once and writes its result
once; as chains of PyTorch ops the same rules make 6 to 15 passes over the (K, ...) derivative
tensors and allocate as many temporaries, a large share of a narrow GPT's Taylor forward. One
program handles a block of elements (GELU) or one row (RMSNorm, rotary embedding)
of the primal and loops over the K directions, so the primal-only quantities (Φ(x), φ(x); the
row's rms; cos, sin) are computed once for all directions.

Arithmetic in float32 (float64 for float64 inputs), as the PyTorch rules. The kernels run on CUDA
tensors and, with ``TRITON_INTERPRET=1`` set before triton is imported, on CPU tensors (tests).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention import accumulation_dtype

__all__ = ["gelu_jet_", "rmsnorm_jet", "rope_heads", "rope_heads_jet"]

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_BLOCK = 1024


def _acc(t: torch.Tensor):
    return tl.float64 if accumulation_dtype(t.dtype) == torch.float64 else tl.float32


@triton.jit
def _gelu_jet_kernel(X, D, DD, n, n_dirs, INV_SQRT2: tl.constexpr, INV_SQRT_2PI: tl.constexpr,
                     BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(X + offs, mask=ok, other=0.0).to(ACC)
    pdf = tl.exp(-0.5 * x * x) * INV_SQRT_2PI                     # φ(x)
    cdf = 0.5 * (1.0 + tl.math.erf(x * INV_SQRT2))                # Φ(x)
    f1 = cdf + x * pdf                                            # f'
    f2 = pdf * (2.0 - x * x)                                      # f''
    tl.store(X + offs, (x * cdf).to(X.dtype.element_ty), mask=ok)
    for k in range(n_dirs):
        at = k * n + offs
        d = tl.load(D + at, mask=ok, other=0.0).to(ACC)
        dd = tl.load(DD + at, mask=ok, other=0.0).to(ACC)
        tl.store(DD + at, (f2 * d * d + f1 * dd).to(DD.dtype.element_ty), mask=ok)
        tl.store(D + at, (f1 * d).to(D.dtype.element_ty), mask=ok)


def gelu_jet_(x: torch.Tensor, d: torch.Tensor, dd: torch.Tensor) -> None:
    """GELU (erf form) of the jet (x (...), d and dd (K, ...)), in place; all contiguous."""
    n = x.numel()
    if n == 0:
        return
    _gelu_jet_kernel[(triton.cdiv(n, _GELU_BLOCK),)](
        x, d, dd, n, d.shape[0], INV_SQRT2=_INV_SQRT2, INV_SQRT_2PI=_INV_SQRT_2PI,
        BLOCK=_GELU_BLOCK, ACC=_acc(x))


@triton.jit
def _rmsnorm_jet_kernel(X, D, DD, W, U, Y, YD, YDD, n_rows, C, n_dirs, eps,
                        BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    ok = cols < C
    x = tl.load(X + row * C + cols, mask=ok, other=0.0).to(ACC)
    w = tl.load(W + cols, mask=ok, other=0.0).to(ACC)
    r = 1.0 / tl.sqrt(tl.sum(x * x, 0) / C + eps)
    r3 = r * r * r
    n = x * r
    tl.store(Y + row * C + cols, (n * w).to(Y.dtype.element_ty), mask=ok)
    for k in range(n_dirs):
        at = (k * n_rows + row) * C + cols
        d = tl.load(D + at, mask=ok, other=0.0).to(ACC)
        dd = tl.load(DD + at, mask=ok, other=0.0).to(ACC)
        u = tl.load(U + k * C + cols, mask=ok, other=0.0).to(ACC)
        mud = 2.0 * tl.sum(x * d, 0) / C
        mudd = 2.0 * tl.sum(d * d + x * dd, 0) / C
        rd = -0.5 * r3 * mud
        rdd = 0.75 * r3 * r * r * mud * mud - 0.5 * r3 * mudd
        nd = d * r + x * rd
        ndd = dd * r + 2.0 * d * rd + x * rdd
        tl.store(YD + at, (nd * w + n * u).to(YD.dtype.element_ty), mask=ok)
        tl.store(YDD + at, (ndd * w + 2.0 * nd * u).to(YDD.dtype.element_ty), mask=ok)


def rmsnorm_jet(x: torch.Tensor, d: torch.Tensor, dd: torch.Tensor, w: torch.Tensor,
                U: torch.Tensor, eps: float, out=None):
    """RMSNorm of the jet over the last dim (size C), weight w (C,) moving as w + t·U (K, C):
    (y, ẏ, ÿ) in x's dtype, new contiguous tensors or written into ``out`` (three contiguous
    tensors shaped as x, d, dd)."""
    x, d, dd, w, U = (t.contiguous() for t in (x, d, dd, w, U))
    C = x.shape[-1]
    rows = x.numel() // max(C, 1)
    y, yd, ydd = out if out is not None else (torch.empty_like(x), torch.empty_like(d),
                                              torch.empty_like(dd))
    if rows and C:
        _rmsnorm_jet_kernel[(rows,)](x, d, dd, w, U, y, yd, ydd, rows, C, d.shape[0], eps,
                                     BLOCK_C=triton.next_power_of_2(C), ACC=_acc(x))
    return y, yd, ydd


@triton.jit
def _rope_heads_kernel(X, Y, COS, SIN, T, H, HALF: tl.constexpr, BLOCK_T: tl.constexpr,
                       ACC: tl.constexpr):
    # X: (R, T, H, 2·HALF) rows of a linear layer's output; Y: (R, H, T, 2·HALF) contiguous
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rh = tl.program_id(1).to(tl.int64)                    # r·H + h
    r, h = rh // H, rh % H
    j = tl.arange(0, HALF)
    ok = (t < T)[:, None]
    src = X + ((r * T + t[:, None]) * H + h) * (2 * HALF) + j[None, :]
    x1 = tl.load(src, mask=ok, other=0.0).to(ACC)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(ACC)
    cos = tl.load(COS + t[:, None] * HALF + j[None, :], mask=ok, other=0.0).to(ACC)
    sin = tl.load(SIN + t[:, None] * HALF + j[None, :], mask=ok, other=0.0).to(ACC)
    dst = Y + (rh * T + t[:, None]) * (2 * HALF) + j[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=ok)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=ok)


def rope_heads(x: torch.Tensor, n_head: int, cos: torch.Tensor, sin: torch.Tensor,
               out=None) -> torch.Tensor:
    """One order of :func:`rope_heads_jet`: (..., T, H·D) -> (..., H, T, D), new or ``out``."""
    *lead, T, C = x.shape
    D = C // n_head
    x = x.contiguous()
    y = out if out is not None else x.new_empty(*lead, n_head, T, D)
    R = x.numel() // max(T * C, 1)
    if R and T:
        block_t = 32
        _rope_heads_kernel[(triton.cdiv(T, block_t), R * n_head)](
            x, y, cos.contiguous(), sin.contiguous(), T, n_head, HALF=D // 2, BLOCK_T=block_t,
            ACC=_acc(x))
    return y


def rope_heads_jet(x: torch.Tensor, d: torch.Tensor, dd: torch.Tensor, n_head: int,
                   cos: torch.Tensor, sin: torch.Tensor):
    """Split (..., T, H·D) into heads and apply the rotary embedding (cos, sin: (T, D/2)) to each
    order of the jet: contiguous (..., H, T, D) tensors, the Taylor attention kernel's layout.
    The head dim D must be a power of two."""
    return tuple(rope_heads(t, n_head, cos, sin) for t in (x, d, dd))
