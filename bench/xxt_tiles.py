"""Tile sweep of the Triton X·Xᵀ kernel (muonkern.ops.triton_symmetric) on a GPU, beside
torch.matmul and, where staged (bench/NOTES.md), flash-muon's and dion's X·Xᵀ kernels:

    python bench/xxt_tiles.py          # bf16, 4096², 8192², 2048×8192; best of 5 × 20 calls
"""
import importlib.util
import itertools
import os
import sys
from pathlib import Path

import torch

from muonkern.ops.triton_symmetric import SyrkConfig, xxt

ANCHORS = Path(os.environ.get("MUONKERN_ANCHORS", Path(__file__).resolve().parents[1] / ".scratch" / "anchors"))


def best_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best


def anchor_kernels() -> dict:
    """X -> X·Xᵀ of each staged anchor (none when the folder is absent)."""
    kernels = {}
    dion_file = ANCHORS / "dion" / "dion" / "newton_schulz_triton.py"
    if dion_file.is_file():
        spec = importlib.util.spec_from_file_location("dion_newton_schulz_triton", dion_file)
        dion = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(dion)
        kernels["dion ns_line_1"] = lambda X: dion.ns_line_1(X)
    if (ANCHORS / "flash-muon").is_dir():
        sys.path.insert(0, str(ANCHORS / "flash-muon"))
        import flash_muon
        kernels["flash-muon matmul_transpose"] = flash_muon.matmul_transpose
    return kernels


def main():
    others = {"torch.matmul": lambda X: torch.matmul(X, X.mT), **anchor_kernels()}
    configs = [SyrkConfig(128, bk, num_warps=w, num_stages=st, group=g)
               for bk, st, w, g in itertools.product([32, 64, 128], [3, 4], [4, 8], [8, 16])
               if bk * st <= 384]  # 128×128 with 4 stages needs more than 228 KB of shared memory
    for m, n in [(4096, 4096), (8192, 8192), (2048, 8192)]:
        X = torch.randn(m, n, device="cuda").bfloat16()
        A = torch.empty(m, m, device="cuda", dtype=torch.bfloat16)
        print(f"{m}x{n}: " + ", ".join(f"{k} {best_ms(lambda: f(X)):.4f} ms" for k, f in others.items()))
        times = sorted((best_ms(lambda: xxt(X, out=A, config=c)), c) for c in configs)
        for t, c in times[:6]:
            print(f"   {t:.4f} ms  {c}")
        print(f"   worst {times[-1][0]:.4f} ms")


if __name__ == "__main__":
    main()
