"""Ground truth and error budgets for muonkern::ns5 tests (CPU and CUDA share them).

`ns5_float64` replays the iteration of muonkern::ns5 in float64 from start to end (no bf16
rounding anywhere), so what the op returns can be held against the exact result of the same
algorithm: X = G / (||G||_F + eps) per matrix; work on the transpose when m > n; `steps` times
A = X X^T, B = b A + c A A, X = a X + B X.

All tolerances of the test suite live here, each with its justification.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# KellerJordan/Muon's (a, b, c), the op's default at every step.
JORDAN = (3.4445, -4.7750, 2.0315)

# Polar Express, 5 steps (safety 2e-2, cushion 2): the per-step schedule of modded-nanogpt and
# nanochat (Amsel et al., arXiv 2505.16932), flattened as the op takes it.
POLAR_EXPRESS = [
    8.156554524902461, -22.48329292557795, 15.878769915207462,
    4.042929935166739, -2.808917465908714, 0.5000178451051316,
    3.8916678022926607, -2.772484153217685, 0.5060648178503393,
    3.285753657755655, -2.3681294933425376, 0.46449024233003106,
    2.3465413258596377, -1.7097828382687081, 0.42323551169305323,
]

# ---------------------------------------------------------------------------------------------
# Error budgets: relative Frobenius error per matrix, ||out - ref||_F / ||ref||_F, against
# ns5_float64 of the same input.
#
# bf16 keeps 8 significant bits (7 stored + the implicit one): machine epsilon 2^-7
# (torch.finfo(torch.bfloat16).eps), unit roundoff u = 2^-8 ~ 3.9e-3. The op rounds its operands
# to bf16 at every step, and the polynomial cancels heavily: with (a, b, c) = (3.4445, -4.775,
# 2.0315), b A + c A A and a X + B X subtract terms of size 2..5 to land near 0.7..1.2, so each
# rounding is amplified several times, five steps in a row. The measured error is therefore
# ~10 u (~3.5e-2), not ~u.
#
# Measured on this machine (torch 2.14.1, CPU), muonkern.ops.fallback.ns5_reference (KellerJordan's
# bf16 arithmetic) vs float64, 512 Gaussian matrices per shape (max over them; median in brackets):
#   Jordan coefficients:  1x1 0.035 | 1x50 0.072 (0.026) | 1x7 0.082 (0.025) | 3x5 0.124 (0.034)
#     4x4 0.186 (0.034) | 8x24 0.057 | 16x16 0.059 | 24x24 0.045 | 17x33 0.044 | 32x128 0.045 (0.036)
#     128x32 0.047 | 64x64 0.036 (0.030)
#   Polar Express:        32x128 0.065 (0.049) | 128x32 0.063 | 64x64 0.044 | 16x16 0.115
#     3x5 0.210 | 1x50 0.322 (its first step has |b| = 22.5, |c| = 15.9: ~4x more cancellation)
# Those ran ATen's CPU bf16 GEMMs, before the CPU kernel's fp32 GEMMs of the bf16 values (README,
# *CPU*). Square tiny matrices have a heavy tail (`python bench/cpu_measurements.py tiny-tail`): over
# 20000 Gaussian 4x4 ones the 99.9th percentile is 0.30 and the worst 0.52 (1.4e-3 of them exceed
# BF16_RTOL_TINY), so no test checks square tiny inputs against it; 3x5, 5x3 and 2x7 stay within
# 0.20 (their 99.9th percentile 0.11-0.15).
# On an H100 (first GPU run) the CUDA kernels, which accumulate in fp32 and apply the polynomial in
# fp32 epilogues, measured 0.009..0.021 on the same kind of inputs, about half the reference's.
# Tiny matrices are worse because a Gaussian 3x5 or 4x4 is often ill-conditioned and the bf16
# rounding of the *input* alone moves its small singular directions; the Frobenius error of an
# n x n matrix is then 1 part in n, so 4x4 shows it and 64x64 does not.
#
# Budgets (about 2x the measured worst case where it can be, 1.3x at least):
BF16_RTOL = 0.12        # Jordan coefficients; vectors (1 x n), 1x1, and short side >= 8
BF16_RTOL_TINY = 0.25   # Jordan coefficients, short side 2..7 (3x5, 4x4, 5x3)
POLAR_RTOL = 0.12       # Polar Express schedule on matrices with short side >= 32
# A wrong schedule is far outside these: steps=4 instead of 5 differs by 0.37, Jordan vs Polar
# Express by 0.27, a 1% change in `a` alone by 0.14, reversing the Polar Express list by 100x.

BF16_U = 2.0 ** -8

# steps=0 returns the normalized input: a bf16 rounding of G, of the norm and of the quotient, each
# <= u relative, so <= 3 u elementwise (first order). Measured worst 5.3e-3 (1.4 u) over 100
# matrices; budget 3 u.
NORMALIZE_RTOL = 3 * BF16_U

# Singular values of the output must lie in the image of the input's normalized singular-value
# interval (widened by u for the bf16 rounding of the input) under the scalar polynomial
# p(x) = a x + b x^3 + c x^5 iterated `steps` times (`sv_band`). The bf16 steps move them by a few
# percent more; measured worst excursion outside the band over 600 Gaussian matrices (120 each of
# 32x128, 128x32, 48x160, 64x64, 16x16): 0.043 (Jordan, at the top of the band, 1.134) and 0.010
# (Polar Express). Budget 0.08.
SV_TOL = 0.08

# Convergent cubic Newton-Schulz (1.5, -0.5, 0) run to convergence (20 steps) gives singular
# values of 1 up to the bf16 rounding of the last step: measured worst |s - 1| = 2.8e-3 (0.7 u)
# over 20 Gaussian 4x32x128 batches; budget 4 u.
ORTHO_TOL = 4 * BF16_U

# The compiled CPU kernel (csrc/ns5_cpu.cpp) runs the same ATen bf16 ops as the Python fallback:
# measured bitwise equal (difference 0.0) on (4,32,128), (3,100,20), (2,64,64). 1e-6 relative
# leaves room for nothing but a change of reduction order in a future torch.
EXT_VS_FALLBACK_RTOL = 1e-6

# ns5_grouped vs single ns5 calls on CUDA (the tests' 4-16-column matrices, entries ≲ 0.5): the same
# bf16 iteration, where a larger batch may take the other path (fused vs general) and accumulate
# its fp32 sums in another order. 1e-3 absolute is below one bf16 ulp of such entries (2^-9), so
# it asserts the same arithmetic up to fp32 reordering, not merely the same bf16 budget.
GROUPED_CUDA_ATOL = 1e-3

# Gram Newton-Schulz (algorithm="gram") computes the same polynomial through R = X Xᵀ: in float64
# (muonkern.ops.fallback.gram_iteration on float64 input) it meets ns5_float64 to rounding: measured
# worst 7e-14 relative on wide, tall, batched and square Gaussian inputs (Jordan and Polar Express,
# any restart steps), 1.3e-13 on ill-conditioned ones (singular values 1..1e-4, up to 20 steps),
# where Q's entries reach a^k (~500 after 5 Jordan steps) and magnify rounding. Budget 1e-10; a
# restart that keeps the old X0 instead of Q X0 is off by 0.076 (48x160), a dropped step by 0.37.
GRAM_FLOAT64_RTOL = 1e-10

# In bf16 the Gram iteration rounds R, P and Q where the standard one rounds A, B and X, and its
# result is about as far from the float64 iteration (Jordan, Gaussian: max 0.040 vs 0.037 for the
# standard path; ill-conditioned, singular values 1..1e-4: 0.18 vs 0.19; Polar Express: 0.08 vs 0.06
# Gaussian, 0.25 vs 0.29 ill-conditioned; 4 seeds of 4x128x512, 4x512x128, 2x256x1024, 8x64x256,
# float32 and bf16 inputs, CPU). Against the exact polar factor U Vᵀ (float64 SVD), the quantity
# Muon cares about, both sit 0.10..0.61 away and differ by that rounding only: measured worst
# excess of gram over standard +0.0116 (Jordan, Gaussian 8x64x256; 3 u), +0.0052 ill-conditioned,
# +0.0034 Polar Express. Budget 5 u ~ 0.0195. Without restarts the drift is far outside: 5 steps
# on ill-conditioned inputs measured +2.2 (4x128x512) and +14 (8x64x256).
GRAM_POLAR_MARGIN = 5 * BF16_U

# Two bf16 implementations (CUDA kernels vs the CPU kernel) each sit within BF16_RTOL of float64;
# their errors are largely independent (~0.035 and ~0.015 typical), so their difference stays
# within the same budget on shapes with short side >= 8.
CROSS_DEVICE_RTOL = BF16_RTOL


def ns5_float64(G: torch.Tensor, steps: int = 5, coefficients: Sequence[float] | None = None,
                eps: float = 1e-7) -> torch.Tensor:
    """The ns5 iteration in float64 throughout; returns float64, G's shape, G's device."""
    X = G.detach().to(torch.float64)
    X = X / (torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) + eps)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    for a, b, c in step_triples(steps, coefficients):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.contiguous()


def step_triples(steps: int, coefficients: Sequence[float] | None) -> list[tuple[float, float, float]]:
    if coefficients is None:
        return [JORDAN] * steps
    assert len(coefficients) == 3 * steps
    return [tuple(float(v) for v in coefficients[3 * i:3 * i + 3]) for i in range(steps)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-matrix ||out - ref||_F / ||ref||_F in float64, shape = out's batch shape."""
    diff = torch.linalg.vector_norm(out.to(torch.float64) - ref.to(torch.float64), dim=(-2, -1))
    scale = torch.linalg.vector_norm(ref.to(torch.float64), dim=(-2, -1))
    return diff / scale


def budget_for(shape: Sequence[int]) -> float:
    """The bf16 budget for the default coefficients on matrices of this (..., m, n) shape."""
    short = min(shape[-2], shape[-1])
    return BF16_RTOL_TINY if 2 <= short < 8 else BF16_RTOL


def assert_ns5_output(out: torch.Tensor, G: torch.Tensor, steps: int = 5,
                      coefficients: Sequence[float] | None = None, eps: float = 1e-7,
                      rtol: float | None = None) -> torch.Tensor:
    """Checks dtype, shape, contiguity, finiteness and the per-matrix error against float64.

    Returns the per-matrix errors (for callers that report them)."""
    assert out.dtype == G.dtype, (out.dtype, G.dtype)
    assert out.shape == G.shape, (out.shape, G.shape)
    assert out.device == G.device, (out.device, G.device)
    assert out.is_contiguous()
    ref = ns5_float64(G, steps, coefficients, eps)
    if out.numel() == 0:
        return torch.empty(0)
    assert torch.isfinite(out).all(), "non-finite values in the output of a finite input"
    if rtol is None:
        rtol = budget_for(G.shape)
    err = rel_err(out, ref).cpu()
    worst = err.max().item()
    assert worst <= rtol, (f"relative Frobenius error {worst:.4g} > budget {rtol:.4g} for shape "
                           f"{tuple(G.shape)} dtype {G.dtype} (per matrix: {err.flatten()[:8].tolist()})")
    return err


def sv_band(s_min: float, s_max: float, steps: int = 5,
            coefficients: Sequence[float] | None = None, points: int = 20001) -> tuple[float, float]:
    """Range of p_steps o ... o p_1 over [s_min, s_max], p_i(x) = a_i x + b_i x^3 + c_i x^5.

    In exact arithmetic the iteration maps each normalized singular value s of the input to
    that composition of scalar polynomials, so every singular value of the output lies in this
    range. Computed on a dense grid (float64), which resolves the extrema to ~1e-8."""
    x = np.linspace(s_min, s_max, points, dtype=np.float64)
    for a, b, c in step_triples(steps, coefficients):
        x = a * x + b * x ** 3 + c * x ** 5
    return float(x.min()), float(x.max())


def assert_singular_values_in_band(out: torch.Tensor, G: torch.Tensor, steps: int = 5,
                                   coefficients: Sequence[float] | None = None, eps: float = 1e-7,
                                   tol: float = SV_TOL) -> None:
    """Every output singular value lies in sv_band of that matrix's normalized input (+- tol)."""
    G64 = G.detach().to(torch.float64).cpu()
    s_in = torch.linalg.svdvals(G64) / (torch.linalg.vector_norm(G64, dim=(-2, -1))[..., None] + eps)
    s_out = torch.linalg.svdvals(out.detach().to(torch.float64).cpu())
    for s_i, s_o in zip(s_in.reshape(-1, s_in.size(-1)), s_out.reshape(-1, s_out.size(-1))):
        # Rounding the normalized input (Frobenius norm 1) to bf16 moves each singular value by at
        # most ||E||_2 <= ||E||_F <= u (Weyl), so the band starts from the widened interval.
        s_lo, s_hi = max(s_i.min().item() - BF16_U, 0.0), min(s_i.max().item() + BF16_U, 1.0)
        lo, hi = sv_band(s_lo, s_hi, steps, coefficients)
        assert lo - tol <= s_o.min().item() and s_o.max().item() <= hi + tol, (
            f"singular values [{s_o.min().item():.4f}, {s_o.max().item():.4f}] outside the band "
            f"[{lo:.4f}, {hi:.4f}] +- {tol} (input normalized singular values "
            f"[{s_i.min().item():.4f}, {s_i.max().item():.4f}])")


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32,
          device: str | torch.device = "cpu") -> torch.Tensor:
    """Gaussian input drawn on the CPU from `gen` (the same numbers on every device)."""
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


# Muon's optimizer tests (justification in tests/test_optim.py's docstring): a batched bf16 ns5
# may round a few entries differently from one call per matrix; 4 bf16 ulps at [1, 2) per entry
# and step, scaled by the step's lr * scale.
BF16_NS5_ATOL = 2.0 ** -5


# tests/test_optim.py::test_matches_torch_optim_muon, whose budget bench/cpu_measurements.py
# (muon-vs-torch) measures on the same configuration
TORCH_MUON_SHAPES = [(32, 64), (64, 32), (17, 40)]
TORCH_MUON_OPTIONS = dict(lr=0.02, momentum=0.95, weight_decay=0.1)
TORCH_MUON_STEPS = 10


def torch_muon_distance(gen: torch.Generator, shape, adjust_lr: str, momentum: float | None = None) -> float:
    """max |muonkern's Muon - torch.optim.Muon| over the parameter after TORCH_MUON_STEPS steps from
    one random start with the same random gradients, in units of lr * scale; ours at `momentum`
    (default TORCH_MUON_OPTIONS's, as torch's)."""
    from muonkern.optim import Muon
    start = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(TORCH_MUON_STEPS)]
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    mine = {**TORCH_MUON_OPTIONS, **({} if momentum is None else {"momentum": momentum})}
    optimizers = [Muon([ours], adjust_lr=adjust_lr, **mine),
                  torch.optim.Muon([theirs], adjust_lr_fn=adjust_lr, **TORCH_MUON_OPTIONS)]
    for g in grads:
        ours.grad, theirs.grad = g.clone(), g.clone()
        for opt in optimizers:
            opt.step()
    return float((ours - theirs).detach().abs().max()) / (TORCH_MUON_OPTIONS["lr"] * muon_scale(*shape, adjust_lr))


def muon_scale(rows: int, cols: int, adjust_lr: str = "original") -> float:
    """The update scale of Muon's adjust_lr rules, written out independently of muonkern.optim."""
    if adjust_lr == "original":
        return max(1.0, rows / cols) ** 0.5
    assert adjust_lr == "match_rms_adamw"
    return 0.2 * (max(rows, cols) ** 0.5)


def bf16_product_excess(out: torch.Tensor, C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float,
                        alpha: float) -> float:
    """The worst entry of |out - (beta C + alpha a b)| over the bound of a bf16 GEMM with fp32
    accumulation: one rounding to bf16 (BF16_U of the result) plus fp32 accumulation over the k
    terms (k 2^-24 sum |terms|). At most 1 for that arithmetic; a, b (..., m, k), (..., k, n)."""
    k = a.size(-1)
    want = beta * C.double() + alpha * (a.double() @ b.double())
    magnitude = abs(beta) * C.double().abs() + abs(alpha) * (a.double().abs() @ b.double().abs())
    bound = BF16_U * want.abs() + (1 + BF16_U) * k * 2.0 ** -24 * magnitude
    return ((out.double() - want).abs() / bound).max().item()
