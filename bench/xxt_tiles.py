"""Tile sweep of the Triton X·Xᵀ kernel (muonkern.ops.triton_symmetric) on a GPU, beside
torch.matmul and, where staged (bench/NOTES.md), flash-muon's and dion's X·Xᵀ kernels:

    python bench/xxt_tiles.py          # bf16, 4096², 8192², 2048×8192; best of 5 × 20 calls
    python bench/xxt_tiles.py --table  # README's table: X·Xᵀ and the polynomial kernel, square vs
                                       # wide tiles vs the autotuned pick vs dion's kernels
    python bench/xxt_tiles.py --fixed  # 6144² and 8192²: the launch without config= (fixed tiles
                                       # from LARGE_M rows), the autotuner's, each TUNED_CONFIGS entry;
                                       # then ns5_symmetric at 8192² fixed vs autotuned vs wide s4
"""
import contextlib
import itertools
import sys

import torch
from measure import back_to_back_ms
from test_bench_anchors import _anchor_module, _dion_module

from muonkern.ops import triton_symmetric
from muonkern.ops.triton_symmetric import (CONFIGS, TUNED_CONFIGS, WIDE_CONFIGS, SyrkConfig, ns5_symmetric,
                                           symmetric_polynomial, xxt)


def best_ms(fn, reps: int = 20) -> float:
    return min(back_to_back_ms(fn, reps))


def anchor_kernels() -> dict:
    """X -> X·Xᵀ of each staged anchor (none when the folder is absent)."""
    kernels = {}
    try:
        kernels["dion ns_line_1"] = _dion_module().ns_line_1
    except Exception as e:  # third-party code: missing or failing to import is reported, not fatal
        print(f"dion: {type(e).__name__}: {e}")
    try:
        kernels["flash-muon matmul_transpose"] = _anchor_module("flash-muon", "flash_muon").matmul_transpose
    except Exception as e:
        print(f"flash-muon: {type(e).__name__}: {e}")
    return kernels


def main():
    others = {"torch.matmul": lambda X: torch.matmul(X, X.mT), **anchor_kernels()}
    configs = [SyrkConfig(128, bk, num_warps=w, num_stages=st, group=g)
               for bk, st, w, g in itertools.product([32, 64, 128], [3, 4, 5], [4, 8], [8, 16])
               if bk * st <= 384]  # 128×128 with 4 stages needs more than 228 KB of shared memory
    # wide 128×256 tiles: (128 + 256)·BLOCK_K·2 bytes a stage, within 228 KB at BLOCK_K·stages <= 256
    configs += [SyrkConfig(128, bk, num_warps=8, num_stages=st, group=g, wide=True)
                for bk, st, g in itertools.product([32, 64], [3, 4, 5], [8, 16]) if bk * st <= 256]
    configs = sorted(set(configs + list(WIDE_CONFIGS)), key=str)
    for m, n in [(4096, 4096), (8192, 8192), (2048, 8192)]:
        X = torch.randn(m, n, device="cuda").bfloat16()
        A = torch.empty(m, m, device="cuda", dtype=torch.bfloat16)
        print(f"{m}x{n}: " + ", ".join(f"{k} {best_ms(lambda: f(X)):.4f} ms" for k, f in others.items()))
        times = sorted((best_ms(lambda: xxt(X, out=A, config=c)), c) for c in configs)
        for t, c in times[:6]:
            print(f"   {t:.4f} ms  {c}")
        print(f"   worst {times[-1][0]:.4f} ms")


def table():
    """Per shape, X·Xᵀ and P = b·A + c·A·A (A = X Xᵀ; dion's ns_line_2 computes the same) in ms:
    dion, the autotuned launch, the two 8-warp square configurations and each wide one; then the
    largest relative error of X·Xᵀ against float64 (bf16 output: one rounding, 2^-8)."""
    dion = _dion_module()
    configs = {"autotuned": None, **{f"{'wide' if c.wide else 'square'} s{c.num_stages}": c
                                     for c in (*CONFIGS[:2], *WIDE_CONFIGS)}}
    worst = 0.0
    for m, n in [(8192, 8192), (4096, 4096), (2048, 8192)]:
        X = torch.randn(m, n, device="cuda").bfloat16()
        A, P = (torch.empty(m, m, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        exact = X.double() @ X.double().mT
        for c in configs.values():
            worst = max(worst, float((xxt(X, out=P, config=c).double() - exact).abs().max() / exact.abs().max()))
        xxt(X, out=A)
        rows = {f"X Xᵀ, {m}x{n}": (lambda: dion.ns_line_1(X, out=P), lambda c: xxt(X, out=P, config=c)),
                f"P, {m}x{m}": (lambda: dion.ns_line_2(A, -4.7750, 2.0315, out=P),
                                lambda c: symmetric_polynomial(A, -4.7750, 2.0315, out=P, config=c))}
        for name, (theirs, ours) in rows.items():
            cells = [f"dion {best_ms(theirs):.4f}"] + [f"{k} {best_ms(lambda: ours(c)):.4f}" for k, c in configs.items()]
            print(f"{name}: " + " | ".join(cells), flush=True)
    print(f"largest relative error of X Xᵀ against float64: {worst:.4f}")


@contextlib.contextmanager
def autotuner_everywhere():
    """Launches without config= go to the autotuner at every size (no fixed tiles from LARGE_M)."""
    fixed_from = triton_symmetric.LARGE_M
    triton_symmetric.LARGE_M = sys.maxsize
    try:
        yield
    finally:
        triton_symmetric.LARGE_M = fixed_from


def fixed():
    """Per size and product: the launch without config=, the same with the autotuner at every size,
    then each configuration the autotuner times; last, the autotuner's picks."""
    def label(c: SyrkConfig) -> str:
        return f"{'wide' if c.wide else f'square {c.block}'} k{c.block_k} w{c.num_warps} s{c.num_stages}"
    for m in (6144, 8192):
        X = torch.randn(m, m, device="cuda").bfloat16()
        A, P = (torch.empty(m, m, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        xxt(X, out=A)
        A.div_(torch.linalg.vector_norm(A.float()))   # an ns5-like A, ‖A‖ = 1
        products = {"X Xᵀ": lambda c: xxt(X, out=P, config=c),
                    "P": lambda c: symmetric_polynomial(A, -4.7750, 2.0315, out=P, config=c, a=3.4445)}
        for name, run in products.items():
            cells = [f"default {best_ms(lambda: run(None)):.4f}"]
            with autotuner_everywhere():
                cells.append(f"autotuned {best_ms(lambda: run(None)):.4f}")
            cells += [f"{label(c)} {best_ms(lambda: run(c)):.4f}" for c in TUNED_CONFIGS]
            print(f"{name}, {m}²: " + " | ".join(cells), flush=True)
    for key, config in triton_symmetric._syrk_autotuned.cache.items():
        print(f"autotuner's pick for (M, K, batch, has_linear, dtypes) = {key}: {config}")
    G = torch.randn(8192, 8192, device="cuda")
    for _ in range(2):   # two rounds: the spread of one launch's timings
        cells = [f"default {best_ms(lambda: ns5_symmetric(G), reps=5):.3f}"]
        with autotuner_everywhere():
            cells.append(f"autotuned {best_ms(lambda: ns5_symmetric(G), reps=5):.3f}")
        cells.append(f"wide s4 {best_ms(lambda: ns5_symmetric(G, config=WIDE_CONFIGS[1]), reps=5):.3f}")
        print("ns5_symmetric, 8192² fp32, ms: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    modes = {"--table": table, "--fixed": fixed}
    modes.get(next((a for a in sys.argv[1:] if a in modes), None), main)()
