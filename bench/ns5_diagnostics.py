"""GPU measurements behind numbers that tests, README.md and bench/NOTES.md cite.

    python bench/ns5_diagnostics.py pair-spread        # one matrix (paired products) vs a batch of two
    python bench/ns5_diagnostics.py symmetric-configs  # 4096²: each Triton tile configuration
    python bench/ns5_diagnostics.py fused-clusters     # the fused kernel per cluster size
    python bench/ns5_diagnostics.py graph-bytes        # what one 2040x2056 graph counts against the budget

Needs a CUDA GPU (symmetric-configs also triton).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import muonkern
from muonkern.ops.ns5_routing import ns5_route

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from ns5_cases import ns5, relative_difference  # noqa: E402  (the tests' own op call and metric)
from ns5_fused_algorithms import median_us  # noqa: E402


def pair_spread() -> None:
    """tests/test_ns5_cuda.py::test_gram_one_matrix_paired_products' PAIRED_RTOL: 12 inputs."""
    os.environ["MUONKERN_NS5_PATH"] = "general"
    for steps in (5, 7):
        diffs = []
        for seed in range(12):
            G = torch.randn(2, 384, 1536, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed))
            diffs.append(relative_difference(ns5(G[0], steps, algorithm="gram"), ns5(G, steps, algorithm="gram")[0]))
        diffs.sort()
        print(f"steps={steps}: one matrix vs a batch of two, relative difference worst {diffs[-1]:.4g}, "
              f"median {diffs[len(diffs) // 2]:.4g}")


def symmetric_configs() -> None:
    """bench/NOTES.md, 4096²: the autotuner's pick and each configuration's kernels and whole call."""
    import triton

    from muonkern.ops import triton_symmetric as ts
    G = torch.randn(4096, 4096, device="cuda")
    for _ in range(3):
        ns5(G, algorithm="auto")
    torch.cuda.synchronize()
    for key, config in ts._syrk_autotuned.cache.items():
        print("autotuner's pick", key, config)
    print(f"op (autotuned): {triton.testing.do_bench(lambda: ns5(G, algorithm='auto'), rep=400):.3f} ms")
    X = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) / 64
    A = torch.empty_like(X)
    S = ts.xxt(X)
    for config in ts.TUNED_CONFIGS:
        xxt = triton.testing.do_bench(lambda: ts.xxt(X, out=A, config=config), rep=200)
        poly = triton.testing.do_bench(lambda: ts.symmetric_polynomial(S, -4.775, 2.0315, out=A, config=config,
                                                                       a=3.4445), rep=200)
        whole = triton.testing.do_bench(lambda: ts.ns5_symmetric(G, config=config), rep=300)
        print(f"{config}: X X^T {xxt:.4f} ms, a I + b A + c A A {poly:.4f} ms, whole call {whole:.3f} ms")
    B = torch.empty_like(X)
    print(f"P X (bmm, 4096^3 bf16): "
          f"{triton.testing.do_bench(lambda: torch.bmm(S[None], X[None], out=B[None])):.4f} ms")


def fused_clusters() -> None:
    """bench/NOTES.md, the fused kernel per cluster size (host time included), and the model's pick."""
    os.environ["MUONKERN_NS5_PATH"] = "fused"
    for shape in [(12, 64, 768), (48, 128, 128), (48, 64, 256)]:
        G = torch.randn(shape, device="cuda")
        for algorithm in ("standard", "gram"):
            cells = []
            for cluster in ("1", "2", "4", "8"):
                os.environ["MUONKERN_NS5_CLUSTER"] = cluster
                route = ns5_route(G, 5, algorithm)
                cells.append(f"{cluster} -> {route.path}/{route.cluster}: "
                             f"{median_us(lambda x: ns5(x, algorithm=algorithm), G):.1f} us")
            del os.environ["MUONKERN_NS5_CLUSTER"]
            print(shape, algorithm, " | ".join(cells), "| model picks", ns5_route(G, 5, algorithm).cluster)


def graph_bytes() -> None:
    """tests/test_ns5_graphs.py's memory-budget tests: the bytes one 2040x2056 standard graph counts."""
    before = muonkern._C.ns5_graph_bytes()
    G = torch.randn(2040, 2056, device="cuda")
    for _ in range(2):  # a signature's second call captures
        ns5(G, algorithm="standard")
    print(f"2040x2056 standard: {(muonkern._C.ns5_graph_bytes() - before) / 2 ** 20:.1f} MiB")


def main() -> None:
    jobs = {"pair-spread": pair_spread, "symmetric-configs": symmetric_configs, "fused-clusters": fused_clusters,
            "graph-bytes": graph_bytes}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=list(jobs))
    job = parser.parse_args().job
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    jobs[job]()


if __name__ == "__main__":
    main()
