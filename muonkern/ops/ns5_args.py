"""Argument rules of muonkern::ns5, shared by the fallback and the fake kernel.

The C++ kernels apply the same rules (csrc/ns5_common.h) with the same messages, so a user sees
one error whichever backend runs.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

# (a, b, c) of KellerJordan/Muon's quintic iteration: steep near zero, singular values land in ~[0.7, 1.2].
JORDAN_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


# Polar Express (Amsel et al. 2025): one triple per step, for 5 steps, as used by modded-nanogpt.
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


ALGORITHMS = ("auto", "standard", "gram")

# ---- algorithm="gram" and the choice of algorithm="auto" ------------------------------------------
# The C++ kernels apply the same rules with the same constants (csrc/ns5_common.h); a test checks that
# both choose alike on a grid of shapes. Recalibrate both after GPU timing.
#
# The Gram iteration restarts (X = Q X0, R = X Xᵀ recomputed, Q = I) after every GRAM_RESTART_INTERVAL
# steps; a last stretch of 3 steps runs without a restart (5 steps: one restart, after step 2). In bf16
# a longer stretch lets rounding in R grow: its smallest eigenvalues, below the rounding of R, may turn
# negative, and R ← P R P multiplies a negative eigenvalue by p(λ)², ~12x a step for Jordan's (a, b, c).
GRAM_RESTART_INTERVAL = 2
# "auto" takes gram where its FLOP count (ns5_flops) is at most (1 - GRAM_MIN_SAVING) of the standard
# iteration's and the short side is at least GRAM_MIN_SHORT_SIDE; square matrices never. With 5 steps
# that is aspect ratio >= 3 (1:3 saves 26%, 1:4 33%, 1:8 46%). The rule holds on CUDA too, where the
# op replays multi-launch calls from CUDA graphs (csrc/ns5_graphs.h), so the Gram iteration's many
# small products cost no more host time than the standard iteration's few large ones. Measured on an
# H100 (ms, standard / gram, bench/test_bench_ns5.py): 768×3072 0.136 / 0.125, 1024×4096 0.242 /
# 0.197, 4096×1024 0.264 / 0.214, 8×1024×4096 1.48 / 1.01, 2048×8192 1.28 / 0.87. On CUDA the fused
# kernel (small matrices) also takes gram below GRAM_MIN_SHORT_SIDE where its own cost model says it
# is no slower (csrc/ns5_cuda.cpp, choose_route; muonkern.ops.ns5_route tells what a call runs).
GRAM_MIN_SAVING = 0.25
GRAM_MIN_SHORT_SIDE = 512


def gram_restart_steps(steps: int) -> list[int]:
    """The steps after which algorithm="gram" restarts (1-based): every GRAM_RESTART_INTERVAL-th,
    except one that would leave a single step to run (5 steps: [2]; 6: [2, 4]; 3: [])."""
    restarts = list(range(GRAM_RESTART_INTERVAL, steps, GRAM_RESTART_INTERVAL))
    if restarts and steps - restarts[-1] < GRAM_RESTART_INTERVAL:
        restarts.pop()
    return restarts


def ns5_flops(m: int, n: int, steps: int, algorithm: str) -> float:
    """Multiply-add FLOPs (2 per multiply-add) of one m×n matrix, r = min(m, n), c = max(m, n).

    standard: per step A = X Xᵀ (2r²c), A·A (2r³), B·X (2r²c).
    gram:     R = X0 X0ᵀ and the output Q·X0 (2r²c each), X = Q X0 and R = X Xᵀ per restart (4r²c),
              and r×r products: R·R every step, P·R·P (two) except at the last step of a stretch,
              P·Q except at its first: 4·steps - 3·stretches of them, stretches = restarts + 1."""
    r, c = float(min(m, n)), float(max(m, n))
    if algorithm == "standard":
        return steps * (4.0 * r * r * c + 2.0 * r * r * r)
    if steps == 0:
        return 0.0
    restarts = len(gram_restart_steps(steps))
    return 2.0 * r * r * c * (2 + 2 * restarts) + 2.0 * r * r * r * (4 * steps - 3 * (restarts + 1))


def choose_algorithm(m: int, n: int, steps: int) -> str:
    """What algorithm="auto" runs for m×n matrices: "gram" or "standard" (rule above)."""
    if m == n or min(m, n) < GRAM_MIN_SHORT_SIDE or steps == 0:
        return "standard"
    gram, standard = ns5_flops(m, n, steps, "gram"), ns5_flops(m, n, steps, "standard")
    return "gram" if gram <= (1.0 - GRAM_MIN_SAVING) * standard else "standard"


def resolve_algorithm(algorithm: str, G: torch.Tensor, steps: int) -> str:
    """"standard" or "gram" for ns5 of G (..., m, n): the algorithm itself, or choose_algorithm's
    pick for "auto"."""
    if algorithm != "auto":
        return algorithm
    m, n = G.shape[-2:]
    return choose_algorithm(m, n, steps)


def resolve_coefficients(coefficients, steps: int) -> list[float] | None:
    """The flattened per-step list ns5 takes, from a preset name ("jordan", "polar_express"), a list
    of (a, b, c) triples, or a flat list of 3*steps numbers. None means Jordan's default."""
    if coefficients is None or coefficients == "jordan":
        return None
    if coefficients == "polar_express":
        if steps != len(POLAR_EXPRESS_COEFFICIENTS):
            raise ValueError(f"the polar_express schedule has {len(POLAR_EXPRESS_COEFFICIENTS)} steps, got steps={steps}")
        return [c for triple in POLAR_EXPRESS_COEFFICIENTS for c in triple]
    if isinstance(coefficients, str):
        raise ValueError(f"unknown coefficient preset {coefficients!r}: use 'jordan', 'polar_express' or a list")
    flat = [float(c) for item in coefficients for c in (item if isinstance(item, (tuple, list)) else (item,))]
    if len(flat) != 3 * steps:
        raise ValueError(f"coefficients must hold 3*steps = {3 * steps} values, got {len(flat)}")
    return flat


# the dtypes the kernels take, ns5 and dirquad alike (csrc/kernel_dtype.h, is_kernel_dtype)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_ns5_args(G: torch.Tensor, steps: int, coefficients: Sequence[float] | None, eps: float,
                   algorithm: str = "auto") -> None:
    """The op's argument checks, in the order and with the messages of csrc/ns5_common.h."""
    check_ns5_tensor(G)
    check_ns5_options(steps, coefficients, eps, algorithm)


def check_ns5_tensor(G: torch.Tensor) -> None:
    """The checks of the tensor alone: rank and dtype."""
    if G.dim() < 2:
        raise ValueError(f"ns5: expected a tensor of rank >= 2 with shape (..., m, n), got shape {tuple(G.shape)}")
    if G.dtype not in KERNEL_DTYPES:
        raise TypeError("ns5: expected a real floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got dtype {G.dtype}")


def check_ns5_options(steps: int, coefficients: Sequence[float] | None, eps: float, algorithm: str = "auto") -> None:
    """The checks of everything but the tensor (ns5_grouped runs them on an empty list too)."""
    if steps < 0:
        raise ValueError(f"ns5: steps must be >= 0, got {steps}")
    if coefficients is not None and len(coefficients) != 3 * steps:
        raise ValueError(
            f"ns5: coefficients must hold 3*steps = {3 * steps} values (one (a, b, c) triple per step), "
            f"got {len(coefficients)}")
    if coefficients is not None and not all(math.isfinite(c) for c in coefficients):
        raise ValueError("ns5: coefficients must be finite (one is NaN or infinite)")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"ns5: eps must be positive and finite (it keeps a zero matrix from dividing by zero), got {eps}")
    if algorithm not in ALGORITHMS:
        # quoted by hand, not with !r, so that the C++ kernels can print the same message
        raise ValueError(f"ns5: algorithm must be 'auto', 'standard' or 'gram', got '{algorithm}'")


def step_coefficients(steps: int, coefficients: Sequence[float] | None) -> list[tuple[float, float, float]]:
    """One (a, b, c) triple per step: the user's flattened list, or Jordan's triple repeated."""
    if coefficients is None:
        return [JORDAN_COEFFICIENTS] * steps
    return [tuple(coefficients[3 * i:3 * i + 3]) for i in range(steps)]
