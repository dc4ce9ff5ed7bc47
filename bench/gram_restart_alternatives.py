"""Why the Gram iteration restarts: its bf16 polar distance against the standard iteration's, with
restarts, without, and without but with R shifted by a multiple of its rounding after every update.

    python bench/gram_restart_alternatives.py        # CPU, seconds

In bf16, R = X Xᵀ has eigenvalues below its rounding that come out negative, and R ← P R P
multiplies a negative one by p(λ)² ≈ 12 a step (Jordan's triple). Restarts (X0 ← Q X0, R = X0 X0ᵀ
afresh after every 2nd step) keep the drift away; they cost 4r²c FLOPs each. The alternative measured
here keeps every R positive instead: R + k·u·mean(diag R)·I after each update (u = 2⁻⁸, bf16's unit
roundoff), with no restart. Columns: polar distance of the standard iteration (‖X − UVᵀ‖/‖UVᵀ‖,
worst over the batch), then for each variant its excess over that. tests/reference.py allows the Gram
iteration 5u ≈ 0.0195 of excess (GRAM_POLAR_MARGIN).
"""
from __future__ import annotations

import torch

from muonkern.ops.fallback import dense_gram_products, gram_iteration, ns5_reference, products_for
from muonkern.ops.ns5_args import gram_restart_steps, step_coefficients
from muonkern.orthogonality import ill_conditioned, polar_distance, polar_factor

SHAPES = ((8, 64, 256), (4, 128, 512), (2, 256, 1024), (4, 512, 128), (1, 512, 2048))
STEPS = 5
U = 2.0 ** -8


def shifted(product, k: float):
    """`product` followed by R + k u mean(diag R) I (per matrix)."""
    def run(*args):
        R = product(*args)
        shift = (k * U * R.diagonal(dim1=-2, dim2=-1).float().mean(-1)).to(R.dtype)
        R.diagonal(dim1=-2, dim2=-1).add_(shift[:, None])
        return R
    return run


def gram_variant(G: torch.Tensor, restarts, shift: float | None) -> torch.Tensor:
    X0 = G.bfloat16()
    X0 = X0 / (torch.linalg.vector_norm(X0, dim=(-2, -1), keepdim=True) + 1e-7)
    products = dense_gram_products(G.size(-2) <= G.size(-1), products_for(X0))
    if shift is not None:
        products = products._replace(gram=shifted(products.gram, shift), conjugate=shifted(products.conjugate, shift))
    return gram_iteration(X0, step_coefficients(STEPS, None), restarts, products)


VARIANTS = {"restarts (ours)": (gram_restart_steps(STEPS), None), "no restart": ((), None),
            "no restart, shift 1u": ((), 1.0), "no restart, shift 4u": ((), 4.0)}


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    print("| input | shape | standard | " + " | ".join(VARIANTS) + " |")
    print("|---|---|---:|" + "---:|" * len(VARIANTS))
    for shape in SHAPES:
        for kind in ("gaussian", "ill-conditioned"):
            G = torch.randn(*shape, generator=gen, dtype=torch.float64) if kind == "gaussian" \
                else ill_conditioned(shape, gen)
            G = G.float()
            polar = polar_factor(G)
            standard = polar_distance(ns5_reference(G, STEPS, algorithm="standard"), polar).max().item()
            excess = [polar_distance(gram_variant(G, *variant), polar).max().item() - standard
                      for variant in VARIANTS.values()]
            print(f"| {kind} | {'x'.join(map(str, shape))} | {standard:.4f} | "
                  + " | ".join(f"{e:+.4f}" for e in excess) + " |", flush=True)


if __name__ == "__main__":
    main()
