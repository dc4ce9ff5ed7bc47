"""Causal softmax attention carried to second order in a direction (Taylor mode).

Every input comes with its first and second derivatives along a curve t ↦ x(t):
``q, qd, qdd`` = q(0), q'(0), q''(0), likewise for k and v. The outputs are o(0), o'(0), o''(0)
of o = softmax(q kᵀ·scale + causal mask) v. Primal tensors are (B, H, T, D); derivative tensors
carry a leading direction dimension K, (K, B, H, T, D): K curves share one primal point.

The math, for one query row q and its keys j ≤ i (s_j = q·k_j·scale, m a running max):

    ṡ_j = (q̇·k_j + q·k̇_j)·scale          s̈_j = (q̈·k_j + 2 q̇·k̇_j + q·k̈_j)·scale
    p_j = exp(s_j − m)    ṗ_j = p_j ṡ_j    p̈_j = p_j (s̈_j + ṡ_j²)
    Z = Σ p_j   Ż = Σ ṗ_j   Z̈ = Σ p̈_j
    A = Σ p_j v_j   Ȧ = Σ ṗ_j v_j + p_j v̇_j   Ä = Σ p̈_j v_j + 2 ṗ_j v̇_j + p_j v̈_j
    o = A/Z    ȯ = (Ȧ − o Ż)/Z    ö = (Ä − 2 ȯ Ż − o Z̈)/Z

(differentiate o·Z = A once and twice). All six sums are linear in p, so when the running max
grows from m to m', each is rescaled by exp(m − m') exactly as in flash attention: one pass over
the keys, in blocks, and nothing of size T×T.

Implementations here:

* :func:`taylor_attention_blocked` — pure PyTorch, query and key blocks with online-softmax
  rescaling (the op's CPU kernel and the fallback everywhere);
* :func:`taylor_attention_dense` — an explicit T×T reference written with the normalized softmax
  π and its derivatives (a different formulation, for tests only);
* :func:`taylor_attention` — calls the custom op ``torch.ops.muonkern.taylor_attention``
  (registered by importing :mod:`muonkern.taylor`; Triton kernel on CUDA where it applies).

Accumulation is float64 for float64 inputs and float32 otherwise; outputs have the inputs' dtype.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional, Tuple

import torch

__all__ = ["accumulation_dtype", "check_taylor_attention_args", "triton_requested", "taylor_attention",
           "taylor_attention_blocked", "taylor_attention_dense"]

Triple = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_NAMES = ("q", "k", "v", "qd", "kd", "vd", "qdd", "kdd", "vdd")


_HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_requested(x: torch.Tensor, env: str, choices: Tuple[str, ...], off: str) -> bool:
    """Whether Triton kernels may run for tensors like x: CUDA tensors where triton is installed,
    unless the environment variable ``env`` (read at every call; one of ``choices``, default
    "auto") equals ``off``."""
    choice = os.environ.get(env, "auto")
    if choice not in choices:
        raise ValueError(f"{env} must be {', '.join(choices[:-1])} or {choices[-1]}, "
                         f"got {choice!r}")
    return choice != off and x.device.type == "cuda" and _HAS_TRITON


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every narrower floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_taylor_attention_args(q, k, v, qd, kd, vd, qdd, kdd, vdd, scale=None) -> None:
    """Raise a clear error unless q, k, v are (B, H, T, D), the six derivatives (K, B, H, T, D)
    with the same (B, H, T, D), all of one real floating dtype and one device."""
    tensors = (q, k, v, qd, kd, vd, qdd, kdd, vdd)
    for name, t in zip(_NAMES, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"taylor_attention: {name} must be a tensor, got {type(t).__name__}")
    for name, t in zip(_NAMES, tensors):
        if not t.is_floating_point():
            raise TypeError(f"taylor_attention: {name} has dtype {t.dtype}; expected a real "
                            "floating-point dtype")
        if t.dtype != q.dtype:
            raise TypeError(f"taylor_attention: {name} has dtype {t.dtype}, q has {q.dtype}; "
                            "all inputs must share one dtype")
        if t.device != q.device:
            raise ValueError(f"taylor_attention: {name} is on {t.device}, q on {q.device}")
    if q.dim() != 4:
        raise ValueError(f"taylor_attention: q must be (B, H, T, D), got shape {tuple(q.shape)}")
    for name, t in zip(_NAMES[1:3], (k, v)):
        if t.shape != q.shape:
            raise ValueError(f"taylor_attention: {name} has shape {tuple(t.shape)}, q has "
                             f"{tuple(q.shape)}; causal self-attention needs equal shapes")
    if qd.dim() != 5 or qd.shape[1:] != q.shape:
        raise ValueError(f"taylor_attention: qd must be (K, *q.shape) with q.shape = "
                         f"{tuple(q.shape)}, got shape {tuple(qd.shape)}")
    for name, t in zip(_NAMES[4:], tensors[4:]):
        if t.shape != qd.shape:
            raise ValueError(f"taylor_attention: {name} has shape {tuple(t.shape)}, qd has "
                             f"{tuple(qd.shape)}; all derivatives must share one shape")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"taylor_attention: scale must be a finite float or None, got {scale!r}")


def softmax_scale(q: torch.Tensor, scale: Optional[float]) -> float:
    """The scores' factor: ``scale``, or 1/√(head dim) when None."""
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _mT(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-2, -1)


def taylor_attention_blocked(q, k, v, qd, kd, vd, qdd, kdd, vdd, scale: Optional[float] = None,
                             block_size: int = 128) -> Triple:
    """Causal Taylor attention over blocks of ``block_size`` queries × ``block_size`` keys with
    online-softmax rescaling (module docstring). Memory beyond inputs and outputs: O(K·B·H·
    block_size²) per step; key blocks above the diagonal are skipped. Any head dim and strides.
    """
    check_taylor_attention_args(q, k, v, qd, kd, vd, qdd, kdd, vdd, scale)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    out_dtype, acc = q.dtype, accumulation_dtype(q.dtype)
    c = softmax_scale(q, scale)
    q, k, v, qd, kd, vd, qdd, kdd, vdd = (t.to(acc) for t in (q, k, v, qd, kd, vd, qdd, kdd, vdd))
    T = q.shape[-2]
    # contiguous outputs whatever the input strides (the fake kernel promises that)
    o = torch.empty(q.shape, dtype=acc, device=q.device)
    od = torch.empty(qd.shape, dtype=acc, device=q.device)
    odd = torch.empty(qd.shape, dtype=acc, device=q.device)
    for i0 in range(0, T, block_size):
        i1 = min(i0 + block_size, T)
        qi, qdi, qddi = q[..., i0:i1, :], qd[..., i0:i1, :], qdd[..., i0:i1, :]
        rows = torch.arange(i0, i1, device=q.device)
        m = torch.full(qi.shape[:-1], -math.inf, dtype=acc, device=q.device)
        z, zd, zdd = (qi.new_zeros(qi.shape[:-1]), qdi.new_zeros(qdi.shape[:-1]),
                      qdi.new_zeros(qdi.shape[:-1]))
        a, ad, add = torch.zeros_like(qi), torch.zeros_like(qdi), torch.zeros_like(qdi)
        for j0 in range(0, i1, block_size):  # causal: keys up to the last query of the block
            j1 = min(j0 + block_size, i1)
            kj, kdj, kddj = _mT(k[..., j0:j1, :]), _mT(kd[..., j0:j1, :]), _mT(kdd[..., j0:j1, :])
            vj, vdj, vddj = v[..., j0:j1, :], vd[..., j0:j1, :], vdd[..., j0:j1, :]
            s = (qi @ kj) * c
            sd = (qdi @ kj + qi @ kdj) * c
            sdd = (qddi @ kj + 2.0 * (qdi @ kdj) + qi @ kddj) * c
            if j1 > i0:  # the block reaches the diagonal
                future = rows[:, None] < torch.arange(j0, j1, device=q.device)[None, :]
                s = s.masked_fill(future, -math.inf)
            # key 0 is in the first block of every row, so m_new is finite from then on
            m_new = torch.maximum(m, s.amax(-1))
            alpha = torch.exp(m - m_new)
            p = torch.exp(s - m_new[..., None])
            pd = p * sd
            pdd = p * (sdd + sd * sd)
            z = z * alpha + p.sum(-1)
            zd = zd * alpha + pd.sum(-1)
            zdd = zdd * alpha + pdd.sum(-1)
            a = a * alpha[..., None] + p @ vj
            ad = ad * alpha[..., None] + pd @ vj + p @ vdj
            add = add * alpha[..., None] + pdd @ vj + 2.0 * (pd @ vdj) + p @ vddj
            m = m_new
        oi = a / z[..., None]
        odi = (ad - oi * zd[..., None]) / z[..., None]
        oddi = (add - 2.0 * odi * zd[..., None] - oi * zdd[..., None]) / z[..., None]
        o[..., i0:i1, :], od[..., i0:i1, :], odd[..., i0:i1, :] = oi, odi, oddi
    return o.to(out_dtype), od.to(out_dtype), odd.to(out_dtype)


def taylor_attention_dense(q, k, v, qd, kd, vd, qdd, kdd, vdd, scale: Optional[float] = None
                           ) -> Triple:
    """Reference with the full T×T normalized softmax π = softmax(s) (tests only).

    With δ = ṡ − ⟨π, ṡ⟩ (the derivative of log π): π̇ = π δ and
    π̈ = π (δ² + s̈ − ⟨π, s̈⟩ − ⟨π, δ²⟩); then o = π v, ȯ = π̇ v + π v̇,
    ö = π̈ v + 2 π̇ v̇ + π v̈.
    """
    check_taylor_attention_args(q, k, v, qd, kd, vd, qdd, kdd, vdd, scale)
    out_dtype, acc = q.dtype, accumulation_dtype(q.dtype)
    c = softmax_scale(q, scale)
    q, k, v, qd, kd, vd, qdd, kdd, vdd = (t.to(acc) for t in (q, k, v, qd, kd, vd, qdd, kdd, vdd))
    T = q.shape[-2]
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    s = (q @ _mT(k) * c).masked_fill(future, -math.inf)
    sd = (qd @ _mT(k) + q @ _mT(kd)) * c
    sdd = (qdd @ _mT(k) + 2.0 * qd @ _mT(kd) + q @ _mT(kdd)) * c
    pi = torch.softmax(s, dim=-1)
    delta = sd - (pi * sd).sum(-1, keepdim=True)
    pid = pi * delta
    pidd = pi * (delta ** 2 + sdd - (pi * sdd).sum(-1, keepdim=True)
                 - (pi * delta ** 2).sum(-1, keepdim=True))
    o = pi @ v
    od = pid @ v + pi @ vd
    odd = pidd @ v + 2.0 * pid @ vd + pi @ vdd
    return o.to(out_dtype), od.to(out_dtype), odd.to(out_dtype)


def taylor_attention(q, k, v, qd, kd, vd, qdd, kdd, vdd, scale: Optional[float] = None
                     ) -> Triple:
    """``torch.ops.muonkern.taylor_attention``: (o, ȯ, ö) of causal softmax attention.

    q, k, v: (B, H, T, D); qd, kd, vd, qdd, kdd, vdd: (K, B, H, T, D), K directions sharing the
    primal inputs. ``scale`` defaults to 1/√D. Forward only (no autograd). On CUDA the Triton
    kernels serve D = 64 in float32/bfloat16 and D = 128 in bfloat16; everything else runs
    :func:`taylor_attention_blocked`.
    """
    return torch.ops.muonkern.taylor_attention(q, k, v, qd, kd, vd, qdd, kdd, vdd,
                                               None if scale is None else float(scale))
