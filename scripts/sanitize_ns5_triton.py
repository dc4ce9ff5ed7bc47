"""Runs the Triton symmetric-product kernels of ns5 once per case, for compute-sanitizer:

    compute-sanitizer --tool memcheck --error-exitcode 3 python scripts/sanitize_ns5_triton.py
    compute-sanitizer --tool racecheck --error-exitcode 3 python scripts/sanitize_ns5_triton.py

Cases: each tile configuration, sizes that are not tile multiples, a batch, a transposed view,
outputs poisoned with NaN; each result checked against float64 torch (bf16 operands, 1e-2).
"""
import torch

from muonkern.ops.triton_symmetric import CONFIGS, ns5_symmetric, symmetric_polynomial, xxt


def close(got, want, what):
    err = float((got.double() - want).norm() / want.norm())
    assert err <= 1e-2, (what, err)


def main():
    gen = torch.Generator().manual_seed(0)
    for config in CONFIGS:
        for shape, transpose in (((2, 200, 300), False), ((130, 70), True)):
            X = torch.randn(shape, generator=gen).to("cuda", torch.bfloat16)
            X = X.mT if transpose else X
            out = torch.full((*X.shape[:-1], X.shape[-2]), float("nan"), device="cuda", dtype=X.dtype)
            close(xxt(X, out=out, config=config), X.double() @ X.double().mT, ("xxt", config, shape))
            A = (X @ X.mT / X.shape[-1]).contiguous()
            out = torch.full_like(A, float("nan"))
            want = -4.775 * A.double() + 2.0315 * A.double() @ A.double()
            close(symmetric_polynomial(A, -4.775, 2.0315, out=out, config=config), want, ("poly", config))
    G = torch.randn(300, 500, generator=gen).cuda()
    assert torch.isfinite(ns5_symmetric(G, config=CONFIGS[0])).all()
    torch.cuda.synchronize()
    print(f"sanitize_ns5_triton: {len(CONFIGS)} configs ran and matched float64")


if __name__ == "__main__":
    main()
