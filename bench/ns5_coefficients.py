"""Orthogonality error of ns5 vs steps for each coefficient schedule and algorithm, in bf16.

    python bench/ns5_coefficients.py [--device cpu|cuda] [--out DIR]

For each input kind (Gaussian; ill-conditioned: singular values log-spaced over four decades) and
shape, and each schedule ("jordan": KellerJordan/Muon's fixed (a, b, c); "polar_express": Amsel et
al. 2025's per-step triples, its first k steps for k < 5) and algorithm ("standard" iteration and
"gram", the same polynomial through the Gram matrix with restarts), it runs muonkern.ns5 with k steps
and reports, against the exact polar factor U Vᵀ of the input (float64 SVD):
  max |σ − 1|      over the singular values of the result (how far from orthogonal)
  ‖X − UVᵀ‖/‖UVᵀ‖  relative Frobenius distance to the polar factor
Writes ns5_coefficients.md to --out (default bench_results/).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import muonkern
from muonkern.ops.ns5_args import POLAR_EXPRESS_COEFFICIENTS
from muonkern.orthogonality import ill_conditioned, polar_distance, polar_factor, singular_value_error

SHAPES = ((512, 512), (256, 1024))
STEPS = {"jordan": range(1, 9), "polar_express": range(1, len(POLAR_EXPRESS_COEFFICIENTS) + 1)}
ALGORITHMS = ("standard", "gram")


def test_matrix(kind: str, shape, gen: torch.Generator) -> torch.Tensor:
    """float64 input: Gaussian, or U diag(σ) Vᵀ with σ log-spaced from 1 to 1e-4 (random U, V)."""
    return torch.randn(shape, generator=gen, dtype=torch.float64) if kind == "gaussian" else ill_conditioned(shape, gen)


def schedule(name: str, steps: int):
    if name == "jordan":
        return None
    return [c for triple in POLAR_EXPRESS_COEFFICIENTS[:steps] for c in triple]


def measure(device: str = "cpu", shapes=SHAPES, seed: int = 0, algorithms=ALGORITHMS):
    rows = []
    for kind in ("gaussian", "ill-conditioned"):
        for shape in shapes:
            G = test_matrix(kind, shape, torch.Generator().manual_seed(seed))
            Gb = G.to(device, torch.bfloat16)
            polar = polar_factor(G)  # once per input, not per row
            for name, steps_range in STEPS.items():
                for algorithm in algorithms:
                    for steps in steps_range:
                        X = muonkern.ns5(Gb, steps=steps, coefficients=schedule(name, steps), algorithm=algorithm)
                        rows.append(dict(input=kind, shape=shape, schedule=name, algorithm=algorithm, steps=steps,
                                         max_sigma_err=float(singular_value_error(X)),
                                         polar_rel_err=float(polar_distance(X, polar))))
    return rows


def table(rows) -> str:
    lines = ["| input | shape | schedule | algorithm | steps | max \\|σ−1\\| | ‖X−UVᵀ‖/‖UVᵀ‖ |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['input']} | {r['shape'][0]}×{r['shape'][1]} | {r['schedule']} | {r['algorithm']} | "
                     f"{r['steps']} | {r['max_sigma_err']:.3f} | {r['polar_rel_err']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    text = (f"# ns5 orthogonality error vs steps (bf16 input, muonkern backend {muonkern.backend()}, "
            f"device {args.device})\n\n" + table(measure(args.device)) + "\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ns5_coefficients.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
