"""GPU measurements behind numbers that tests, README.md and bench/NOTES.md cite.

    python bench/ns5_diagnostics.py pair-spread        # one matrix (paired products) vs a batch of two
    python bench/ns5_diagnostics.py symmetric-configs  # 4096²: each Triton tile configuration
    python bench/ns5_diagnostics.py fused-clusters     # the fused kernel per cluster size
    python bench/ns5_diagnostics.py graph-bytes        # what one 2040x2056 graph counts against the budget
    python bench/ns5_diagnostics.py wgmma              # "auto" with the wgmma kernel on, off, on (compute
                                                       # capability 9.0): route and time per shape
    python bench/ns5_diagnostics.py streamk            # the Gram iteration's symmetric products: cuBLAS,
                                                       # the triangle kernel, stream-K per configuration and
                                                       # program count; whole calls (host time included)
    python bench/ns5_diagnostics.py streamk-once       # three launches of each Triton kernel at 2048², for ncu
    python bench/ns5_diagnostics.py reference-ab       # the benchmarks' reference against the fallback's
                                                       # ns5_reference (the one before), alternated

Needs a CUDA GPU (symmetric-configs and streamk also triton).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

import muonkern
from muonkern.ops.ns5_routing import ns5_route

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from ns5_cases import ns5, relative_difference  # noqa: E402  (the tests' own op call and metric)
from measure import back_to_back_ms, graph_replay_ms  # noqa: E402
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


def wgmma() -> None:
    """README's wgmma table: "auto" per shape with MUONKERN_NS5_WGMMA 1, 0, 1 in one process (the
    route it takes; the median of 5 rounds of 200 back-to-back calls, µs a call). Where "auto" keeps
    the fused Gram iteration, also the standard iteration on the wgmma kernel, which it turned down
    (csrc/ns5_cuda.cpp, choose_route)."""
    os.environ.pop("MUONKERN_NS5_PATH", None)
    for shape in [(48, 128, 128), (48, 96, 128), (4, 100, 120), (132, 128, 128), (48, 64, 128), (64, 32, 128),
                  (8, 128, 64)]:
        G = torch.randn(shape, device="cuda")
        cells = []
        for on in ("1", "0", "1"):
            os.environ["MUONKERN_NS5_WGMMA"] = on
            per_call = _median_in_us(back_to_back_ms(lambda: ns5(G, algorithm="auto"), calls=200))
            cells.append(f"wgmma={on} {tuple(ns5_route(G))}: {per_call:.1f} us")
        if ns5_route(G).algorithm == "gram":
            per_call = _median_in_us(back_to_back_ms(lambda: ns5(G, algorithm="standard"), calls=200))
            cells.append(f"standard on wgmma: {per_call:.1f} us")
        print(shape, " | ".join(cells))
    del os.environ["MUONKERN_NS5_WGMMA"]


def graph_bytes() -> None:
    """tests/test_ns5_graphs.py's memory-budget tests: the bytes one 2040x2056 standard graph counts."""
    before = muonkern._C.ns5_graph_bytes()
    G = torch.randn(2040, 2056, device="cuda")
    for _ in range(2):  # a signature's second call captures
        ns5(G, algorithm="standard")
    print(f"2040x2056 standard: {(muonkern._C.ns5_graph_bytes() - before) / 2 ** 20:.1f} MiB")


def _median_in_us(times_ms: list[float]) -> float:
    """The median of times in ms, in µs."""
    return statistics.median(times_ms) * 1000


def _symmetric_bf16(n: int) -> torch.Tensor:
    """A Gram-like symmetric n×n matrix, unit Frobenius norm, bf16."""
    Y = torch.randn(n, n, device="cuda") / n ** 0.5
    R = Y @ Y.T
    return (R / R.norm()).to(torch.bfloat16)


def streamk() -> None:
    """bench/NOTES.md, *The stream-K kernel on an H100*: P = c·R·R + b·R + a·I and X·Xᵀ on cuBLAS,
    the triangle kernel and the stream-K kernel per configuration and program count (one per SM,
    one per tile, two tiles each), back to back (host time included: median of 7 rounds of 20
    calls) and, for cuBLAS and stream-K at one program per SM, as CUDA-graph replays (GPU time:
    median of 5 replays of 20 calls); then whole ns5 calls on the op's route and on the Triton Gram
    route (autotuned; 128² s4 with graphs where `graph_pays`, eager, with graph replays)."""
    from muonkern.ops import triton_gram as tg
    from muonkern.ops import triton_symmetric as ts
    configs = {f"{c.block}² s{c.num_stages}": c for c in tg.CONFIGS}
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def host_us(fn, calls=20):
        return _median_in_us(back_to_back_ms(fn, calls, rounds=7))

    def products(title: str, A: torch.Tensor, B: torch.Tensor, polynomial: bool) -> None:
        """One product (A·B, or c·A·B + b·A + a·I where `polynomial`) on each implementation."""
        terms = (0.3, A, 0.5, 1.0) if polynomial else ()
        triangle = (lambda: ts.symmetric_polynomial(A, 0.5, 0.3)) if polynomial else (lambda: ts.xxt(A))
        print(f"{title}: cuBLAS (torch.mm) {host_us(lambda: torch.mm(A, B)):.2f} us, graph replay "
              f"{_median_in_us(graph_replay_ms(lambda: torch.mm(A, B))):.2f} us; triangle kernel {host_us(triangle):.2f} us; "
              f"stream-K autotuned {host_us(lambda: tg.symmetric_product(A, B, *terms)):.2f} us")
        for name, config in configs.items():
            tiles = ts._programs(1, A.size(0), config.block, False)
            cells = [f"{p} programs {host_us(lambda: tg.symmetric_product(A, B, *terms, config=config, programs=p)):.2f}"
                     for p in sorted({sms, tiles, max(1, tiles // 2)})]
            replay = _median_in_us(graph_replay_ms(lambda: tg.symmetric_product(A, B, *terms, config=config)))
            print(f"  stream-K {name}: " + ", ".join(cells) + f" us; graph replay, {sms} programs, {replay:.2f} us")

    for n in (2048, 1024):
        products(f"P {n}^2", _symmetric_bf16(n), _symmetric_bf16(n), polynomial=True)
    for m, k in ((2048, 8192), (1024, 4096)):
        X = (torch.randn(m, k, device="cuda") / (m * k) ** 0.5).to(torch.bfloat16)
        products(f"X X^T {m}x{k}", X, X.T, polynomial=False)
    for shape in ((2048, 8192), (1024, 4096), (768, 3072), (8, 1024, 4096)):
        G = torch.randn(*shape, device="cuda")
        calls = {"op": lambda: ns5(G, algorithm="auto"),
                 "Triton Gram route autotuned": lambda: tg.ns5_gram_symmetric(G),
                 "128² s4": lambda: tg.ns5_gram_symmetric(G, config=tg.CONFIGS[0]),   # graphs where they pay
                 "128² s4 eager": lambda: tg.ns5_gram_symmetric(G, config=tg.CONFIGS[0], graph=False),
                 "128² s4 with graph replays": lambda: tg.ns5_gram_symmetric(G, config=tg.CONFIGS[0], graph=True)}
        print(f"ns5 {'x'.join(map(str, shape))}: "
              + ", ".join(f"{label} {host_us(fn, calls=10):.1f} us" for label, fn in calls.items()))


def streamk_once() -> None:
    """Three launches each of the stream-K kernel and the triangle kernel (P at 2048², 128² tiles, 4
    stages), for ncu: `ncu --kernel-name regex:"streamk|syrk" --launch-skip 2 --launch-count 2
    --section SpeedOfLight --section Occupancy --section SchedulerStats python bench/ns5_diagnostics.py streamk-once`."""
    from muonkern.ops import triton_gram as tg
    from muonkern.ops import triton_symmetric as ts
    R = _symmetric_bf16(2048)
    for _ in range(3):
        tg.symmetric_product(R, R, 0.3, R, 0.5, 1.0, config=tg.CONFIGS[0])
        ts.symmetric_polynomial(R, 0.5, 0.3, config=ts.CONFIGS[0])
    torch.cuda.synchronize()


def reference_ab() -> None:
    """README (*Benchmarks*): bench/reference_ns5.py against muonkern.ops.fallback.ns5_reference (the
    same ATen ops on a GPU plus the op's argument checks), new, old, new, old: the median of 5 rounds
    of 50 back-to-back calls, µs a call."""
    from reference_ns5 import reference_ns5

    from muonkern.ops.fallback import ns5_reference
    for shape in [(48, 128, 128), (12, 64, 768), (768, 768), (768, 3072), (1024, 4096)]:
        G = torch.randn(shape, device="cuda")
        calls = [("new", lambda: reference_ns5(G)), ("old", lambda: ns5_reference(G, 5, None, 1e-7, "standard"))] * 2
        print(shape, " | ".join(f"{name} {_median_in_us(back_to_back_ms(fn, calls=50)):.1f}" for name, fn in calls), "us")


def main() -> None:
    jobs = {"pair-spread": pair_spread, "symmetric-configs": symmetric_configs, "fused-clusters": fused_clusters,
            "graph-bytes": graph_bytes, "streamk": streamk, "streamk-once": streamk_once, "wgmma": wgmma,
            "reference-ab": reference_ab}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=list(jobs))
    job = parser.parse_args().job
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    jobs[job]()


if __name__ == "__main__":
    main()
