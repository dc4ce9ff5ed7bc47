"""Where the fused kernel's bf16 roundings cost the Gram iteration accuracy: its products emulated on
the CPU (fp32 products of bf16 values, every result rounded to bf16, the ones computed on one
triangle of tiles mirrored) as GramProducts for muonkern.ops.fallback.gram_iteration, on the inputs
of tests/test_ns5_cuda.py::test_gram_distance_to_polar_factor. Reported: each variant's excess
distance to the exact polar factor over the standard iteration's (the reference, ns5_reference),
worst of the batch; the tests allow GRAM_POLAR_MARGIN = 0.0195.

    python bench/gram_rounding_emulation.py

Variants: the fused kernel with Q = P Q computed whole (as it is) or mirrored from one triangle, and
the reference Gram iteration (gram_iteration's own bf16 products, as the CPU kernel runs them).
Mirroring is emulated per element, not per tile, and the summation order is not the GPU's.
"""
from __future__ import annotations

import zlib

import torch

from muonkern import orthogonality
from muonkern.ops.fallback import GramProducts, gram_iteration, ns5_reference
from muonkern.ops.ns5_args import gram_restart_steps, step_coefficients

STEPS = 5


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def mirror_lower(M: torch.Tensor) -> torch.Tensor:
    """The lower triangle, mirrored: what a product on one triangle of tiles stores."""
    return torch.tril(M) + torch.tril(M, -1).mT


def fused_products(mirror_accumulate: bool) -> GramProducts:
    """The fused kernel's products on a wide iterate (csrc/kernels/ns5_fused_kernel.cuh)."""
    def polynomial(R, a, b, c):
        return bf16(mirror_lower(c * R @ R + b * R + a * torch.eye(R.size(-1))))

    def accumulate(P, Q):
        return bf16(mirror_lower(P @ Q) if mirror_accumulate else P @ Q)

    def apply(Q, Y):
        return bf16(Q @ Y)

    return GramProducts(gram=lambda Y: bf16(mirror_lower(Y @ Y.mT)), polynomial=polynomial,
                        accumulate=accumulate, conjugate=lambda P, R: bf16(mirror_lower(bf16(mirror_lower(P @ R)) @ P)),
                        apply=apply, output=apply)


def main() -> None:
    triples, restarts = step_coefficients(STEPS, None), gram_restart_steps(STEPS)
    print("excess over the standard iteration, worst of 4 matrices (margin 0.0195)")
    print("| input | fused, Q = P Q whole | fused, Q = P Q mirrored | reference Gram |")
    print("|---|---:|---:|---:|")
    for shape, kind in [((4, 128, 512), "ill-conditioned"), ((4, 512, 128), "ill-conditioned"),
                        ((4, 128, 512), "gaussian"), ((4, 512, 128), "gaussian")]:
        name = "x".join(map(str, shape))
        node = f"tests/test_ns5_cuda.py::test_gram_distance_to_polar_factor[{name}-{kind}]"
        gen = torch.Generator().manual_seed(zlib.crc32(node.encode()))  # the test's seed and draws (tests/)
        G = torch.randn(*shape, generator=gen) if kind == "gaussian" else orthogonality.ill_conditioned(shape, gen).float()
        wide = G if shape[-2] <= shape[-1] else G.mT  # the fused kernel iterates on the wide orientation
        polar = orthogonality.polar_factor(wide)
        standard = orthogonality.polar_distance(ns5_reference(wide, STEPS, algorithm="standard"), polar)
        X0 = ns5_reference(wide, 0).bfloat16()  # the normalized input
        outs = [gram_iteration(X0.float(), triples, restarts, fused_products(mirror))
                for mirror in (False, True)] + [gram_iteration(X0, triples, restarts)]
        excess = [(orthogonality.polar_distance(out, polar) - standard).max().item() for out in outs]
        print(f"| {name} {kind} | " + " | ".join(f"{e:+.4f}" for e in excess) + " |")


if __name__ == "__main__":
    main()
