"""Runs the Triton symmetric-product kernels of ns5 (muonkern.ops.triton_symmetric, and the stream-K
kernel of muonkern.ops.triton_gram) once per case, for compute-sanitizer:

    compute-sanitizer --tool memcheck --error-exitcode 3 python scripts/sanitize_ns5_triton.py
    compute-sanitizer --tool racecheck --error-exitcode 3 python scripts/sanitize_ns5_triton.py
    ... python scripts/sanitize_ns5_triton.py --only stream-k   # one family: symmetric, stream-k, small

Cases: each tile configuration, sizes that are not tile multiples, a batch, a transposed view,
outputs poisoned with NaN; the stream-K kernel also with one program per SM and with 7 programs
(tiles split across programs); each result checked against float64 torch (bf16 operands, 1e-2);
and ns5_small (muonkern.ops.triton_small) per configuration on the shapes it serves (64- and
128-row blocks, wide and tall), finite.
"""
import argparse

import torch

from muonkern.ops import triton_gram, triton_small
from muonkern.ops.triton_symmetric import CONFIGS, TUNED_CONFIGS, ns5_symmetric, symmetric_polynomial, xxt


def close(got, want, what):
    err = float((got.double() - want).norm() / want.norm())
    assert err <= 1e-2, (what, err)


def symmetric_cases(gen) -> str:
    for config in TUNED_CONFIGS:
        for shape, transpose in (((2, 200, 300), False), ((130, 70), True)):
            X = torch.randn(shape, generator=gen).to("cuda", torch.bfloat16)
            X = X.mT if transpose else X
            out = torch.full((*X.shape[:-1], X.shape[-2]), float("nan"), device="cuda", dtype=X.dtype)
            close(xxt(X, out=out, config=config), X.double() @ X.double().mT, ("xxt", config, shape))
            A = (X @ X.mT / X.shape[-1]).contiguous()
            out = torch.full_like(A, float("nan"))
            I = torch.eye(A.shape[-1], device="cuda", dtype=torch.float64)
            want = 3.4445 * I - 4.775 * A.double() + 2.0315 * A.double() @ A.double()
            close(symmetric_polynomial(A, -4.775, 2.0315, out=out, config=config, a=3.4445), want, ("poly", config))
    G = torch.randn(300, 500, generator=gen).cuda()
    assert torch.isfinite(ns5_symmetric(G, config=CONFIGS[0])).all()
    return f"{len(TUNED_CONFIGS)} symmetric-product configs matched float64"


def stream_k_cases(gen) -> str:
    for config in triton_gram.CONFIGS:
        for programs in (None, 7):
            for shape, transpose in (((2, 200, 300), False), ((130, 70), True)):
                X = torch.randn(shape, generator=gen).to("cuda", torch.bfloat16)
                X = X.mT if transpose else X
                out = torch.full((*X.shape[:-1], X.shape[-2]), float("nan"), device="cuda", dtype=X.dtype)
                got = triton_gram.symmetric_product(X, X.mT, out=out, config=config, programs=programs)
                close(got, X.double() @ X.double().mT, ("stream-K X Xᵀ", config, programs, shape))
                A = (X @ X.mT / X.shape[-1]).contiguous()
                out = torch.full_like(A, float("nan"))
                want = 2.0315 * A.double() @ A.double() - 4.775 * A.double() + 3.4445 * torch.eye(
                    A.shape[-1], dtype=torch.float64, device="cuda")
                got = triton_gram.symmetric_product(A, A, 2.0315, A, -4.775, 3.4445, out=out, config=config,
                                                    programs=programs)
                close(got, want, ("stream-K polynomial", config, programs))
    G = torch.randn(300, 500, generator=gen).cuda()
    assert torch.isfinite(triton_gram.ns5_gram_symmetric(G, config=triton_gram.CONFIGS[0])).all()
    return f"{len(triton_gram.CONFIGS)} stream-K configs matched float64"


def small_cases(gen) -> str:
    runs = 0
    for config in triton_small.CONFIGS:
        # 64-row blocks wide and tall, 128-row blocks (short side 100)
        for shape in ((3, 64, 200), (2, 100, 40), (2, 100, 300)):
            G = torch.randn(shape, generator=gen).cuda()
            if triton_small._fits(config, triton_small._block_m(min(shape[-2:]))):
                assert torch.isfinite(triton_small.ns5_small(G, config=config)).all(), ("ns5_small", config, shape)
                runs += 1
    return f"ns5_small ran {runs} (config, shape) cases, finite"


FAMILIES = {"symmetric": symmetric_cases, "stream-k": stream_k_cases, "small": small_cases}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(FAMILIES), help="one kernel family (default: all)")
    only = parser.parse_args().only
    gen = torch.Generator().manual_seed(0)
    reports = [run(gen) for name, run in FAMILIES.items() if only in (None, name)]
    torch.cuda.synchronize()
    print("sanitize_ns5_triton: " + "; ".join(reports))


if __name__ == "__main__":
    main()
