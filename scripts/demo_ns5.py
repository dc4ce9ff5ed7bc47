#!/usr/bin/env python
"""Demo of muonkern's ns5 op: orthogonalizes a batch of random matrices on the available device and
reports the backend, the path, the error against the float64 replica of the iteration, the range of
output singular values and the time against the reference implementation (KellerJordan/Muon's).

    python scripts/demo_ns5.py                   # (12, 64, 768) on a GPU, (4, 64, 256) on CPU
    python scripts/demo_ns5.py --shape 768,3072 --steps 5

Exits with status 1 if the error exceeds the test suite's bf16 budget.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import muonkern  # noqa: E402
from muonkern.ops.fallback import ns5_reference  # noqa: E402
from reference import budget_for, ns5_float64, rel_err, sv_band  # noqa: E402


def time_ms(fn, G: torch.Tensor, rounds: int = 20) -> float:
    """Median ms per call; each timed round runs k calls, then synchronizes."""
    sync = torch.cuda.synchronize if G.is_cuda else (lambda: None)
    fn(G)
    sync()
    start, calls = time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - start < 0.05:
        fn(G)
        calls += 1
    sync()
    k = max(1, round(2e-3 / ((time.perf_counter() - start) / calls)))
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(k):
            fn(G)
        sync()
        samples.append((time.perf_counter() - t0) / k)
    return statistics.median(samples) * 1e3


def fused_fits(m: int, n: int, steps: int) -> bool | None:
    """Whether the fused kernel can take an m x n problem on this GPU at some cluster size S in
    {1, 2, 4, 8} (the shared-memory rule of README.md, "The fused path")."""
    if not torch.cuda.is_available():
        return None
    short, long = min(m, n), max(m, n)
    if short > 128 or steps > 32:
        return False
    rp = -(-short // 32) * 32
    limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    for S in (1, 2, 4, 8):
        cs = -(-long // (16 * S)) * 16
        need = 2 * rp * (cs + 8) + 4 * rp * (rp + 8) + 256 + (4 * rp * rp if S > 1 else 0)
        if need <= limit:
            return True
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", help="comma-separated, e.g. 12,64,768")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = tuple(int(s) for s in args.shape.split(",")) if args.shape else (
        (12, 64, 768) if device == "cuda" else (4, 64, 256))
    gen = torch.Generator().manual_seed(args.seed)
    G = torch.randn(shape, generator=gen).to(device)

    print(f"muonkern {muonkern.__version__}  backend: {muonkern.backend()}  torch {torch.__version__}  "
          f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")
    path = os.environ.get("MUONKERN_NS5_PATH", "auto")
    fits = fused_fits(shape[-2], shape[-1], args.steps)
    if device == "cuda" and muonkern.backend() == "cuda":
        print(f"path: MUONKERN_NS5_PATH={path}; fused kernel fits this shape: {'yes' if fits else 'no'} "
              f"(auto picks by a cost model)")
    else:
        print(f"path: {'C++ CPU kernel' if muonkern.backend() != 'fallback' else 'pure-PyTorch fallback'}")
    print(f"input: {tuple(shape)} float32, steps={args.steps}")

    out = muonkern.ns5(G, args.steps)
    ref64 = ns5_float64(G, args.steps)
    err = rel_err(out, ref64).flatten()
    err_ref = rel_err(ns5_reference(G, args.steps, None, 1e-7, "standard"), ref64).flatten()
    budget = budget_for(shape)
    print(f"relative Frobenius error vs float64 replica: max {err.max():.3e}, median {err.median():.3e} "
          f"(bf16 reference: max {err_ref.max():.3e}; budget {budget})")

    G64 = G.double().cpu()
    s_in = torch.linalg.svdvals(G64) / (torch.linalg.vector_norm(G64, dim=(-2, -1))[..., None] + 1e-7)
    s_out = torch.linalg.svdvals(out.double().cpu())
    lo, hi = sv_band(s_in.min().item(), s_in.max().item(), args.steps)
    print(f"output singular values in [{s_out.min():.4f}, {s_out.max():.4f}]; "
          f"the iteration's exact band for this input: [{lo:.4f}, {hi:.4f}]")

    t_ref = time_ms(lambda x: ns5_reference(x, args.steps, None, 1e-7, "standard"), G)
    print(f"time per call: reference {t_ref:.3f} ms")
    paths = ["auto", "fused", "general"] if device == "cuda" and muonkern.backend() == "cuda" else [path]
    for p in paths:
        if p == "fused" and not fits:
            continue
        os.environ["MUONKERN_NS5_PATH"] = p
        t = time_ms(lambda x: muonkern.ns5(x, args.steps, algorithm="standard"), G)
        label = f"muonkern ({p} path)" if len(paths) > 1 else "muonkern"
        print(f"time per call: {label} {t:.3f} ms  ({t_ref / t:.2f}x the reference's speed)")
    os.environ["MUONKERN_NS5_PATH"] = path
    t = time_ms(lambda x: muonkern.ns5(x, args.steps, algorithm="gram"), G)
    print(f"time per call: muonkern (gram) {t:.3f} ms  ({t_ref / t:.2f}x the reference's speed)")
    return 0 if err.max().item() <= budget else 1


if __name__ == "__main__":
    sys.exit(main())
