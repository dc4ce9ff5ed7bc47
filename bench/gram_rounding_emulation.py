"""Where the bf16 roundings of the Gram iteration cost accuracy: a CPU emulation of the CUDA
kernels' rounding points (bf16 operands, fp32 products, bf16 results), on the inputs of
tests/test_ns5_cuda.py::test_gram_distance_to_polar_factor, reporting each variant's distance to the
exact polar factor and its excess over the fused kernel's standard iteration (the test's margin:
GRAM_POLAR_MARGIN = 0.0195).

    python bench/gram_rounding_emulation.py

Variants: the fused kernel's Gram iteration with Q = P Q computed whole (as it is) or on one triangle
of tiles and mirrored, and the cuBLASLt Gram iteration (csrc/ns5_cuda.cpp: P kept as B = b R + c R R
with a I added through beta after a stretch's first step; fp32 output). Mirroring is emulated per
element, not per tile. The emulation is not bitwise the GPU's (summation order differs).
"""
from __future__ import annotations

import os
import sys
import zlib

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from ns5_cases import ill_conditioned  # noqa: E402
from reference import GRAM_POLAR_MARGIN, JORDAN, randn  # noqa: E402

from muonkern import orthogonality  # noqa: E402
from muonkern.ops.ns5_args import gram_restart_steps  # noqa: E402

STEPS = 5


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def mirror_lower(M: torch.Tensor) -> torch.Tensor:
    """The lower triangle, mirrored: what a product on one triangle of tiles stores."""
    return torch.tril(M) + torch.tril(M, -1).mT


def normalized(G: torch.Tensor) -> torch.Tensor:
    return bf16(G / (torch.linalg.vector_norm(G, dim=(-2, -1), keepdim=True) + 1e-7))


def fused_standard(X: torch.Tensor) -> torch.Tensor:
    a, b, c = JORDAN
    for _ in range(STEPS):
        A = bf16(mirror_lower(X @ X.mT))
        B = bf16(mirror_lower(c * A @ A + b * A))
        X = bf16(B @ X + a * X)
    return X


def fused_gram(X: torch.Tensor, mirror_q: bool) -> torch.Tensor:
    a, b, c = JORDAN
    eye = torch.eye(X.shape[-2])
    restarts = gram_restart_steps(STEPS)
    R, Q, stretch_start = bf16(mirror_lower(X @ X.mT)), None, True
    for s in range(1, STEPS + 1):
        P = bf16(mirror_lower(c * R @ R + b * R + a * eye))
        Q = P if stretch_start else bf16(mirror_lower(P @ Q) if mirror_q else P @ Q)
        stretch_start = False
        if s == STEPS:
            break
        if s in restarts:
            X = bf16(Q @ X)
            R, stretch_start = bf16(mirror_lower(X @ X.mT)), True
            continue
        R = bf16(mirror_lower(bf16(mirror_lower(P @ R)) @ P))
    return bf16(Q @ X)


def cublaslt_gram(X: torch.Tensor) -> torch.Tensor:
    a, b, c = JORDAN
    eye = torch.eye(X.shape[-2])
    restarts = gram_restart_steps(STEPS)
    R, Q, stretch_start = bf16(X @ X.mT), None, True
    for s in range(1, STEPS + 1):
        PB = bf16(c * R @ R + b * R)
        if stretch_start:  # P written whole, its a I by the diagonal kernel
            PB, shift = bf16(PB + a * eye), 0.0
            Q = PB
        else:  # P M = B M + a M
            shift = a
            Q = bf16(PB @ Q + a * Q)
        stretch_start = False
        if s == STEPS:
            break
        if s in restarts:
            X = bf16(Q @ X)
            R, stretch_start = bf16(X @ X.mT), True
            continue
        PR = bf16(PB @ R + shift * R)
        R = bf16(PR @ PB + shift * PR)
    return Q @ X  # fp32 output straight from the accumulator


def main() -> None:
    print(f"excess over the fused standard iteration, worst of 4 matrices (margin {GRAM_POLAR_MARGIN:.4f})")
    print("| input | fused, Q = P Q whole | fused, Q = P Q mirrored | cuBLASLt |")
    print("|---|---:|---:|---:|")
    for shape, kind in [((4, 128, 512), "ill-conditioned"), ((4, 512, 128), "ill-conditioned"),
                        ((4, 128, 512), "gaussian"), ((4, 512, 128), "gaussian")]:
        name = "x".join(map(str, shape))
        node = f"tests/test_ns5_cuda.py::test_gram_distance_to_polar_factor[{name}-{kind}]"
        gen = torch.Generator().manual_seed(zlib.crc32(node.encode()))  # the test's seed (tests/conftest.py)
        G = (randn(gen, *shape, dtype=torch.float64) if kind == "gaussian" else ill_conditioned(gen, *shape)).float()
        wide = G if shape[-2] <= shape[-1] else G.mT  # the kernels iterate on the wide orientation
        polar = orthogonality.polar_factor(wide)
        X0 = normalized(wide)
        standard = orthogonality.polar_distance(fused_standard(X0), polar)
        excess = [(orthogonality.polar_distance(out, polar) - standard).max().item()
                  for out in (fused_gram(X0, mirror_q=False), fused_gram(X0, mirror_q=True), cublaslt_gram(X0))]
        print(f"| {name} {kind} | " + " | ".join(f"{e:+.4f}" for e in excess) + " |")


if __name__ == "__main__":
    main()
