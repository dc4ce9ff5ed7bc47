"""Time and peak memory of one GPU call, shared by the benchmarks whose calls take milliseconds."""
from __future__ import annotations

import time
from typing import Callable


def measure_call(fn: Callable[[], object], benchmark, budget_s: float, max_rounds: int = 50) -> dict:
    """Warm-up call, one call for peak memory (beyond what was allocated before it), then timed
    rounds of one call and one synchronize through pytest-benchmark, about ``budget_s`` in all."""
    import torch

    fn()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated()
    rounds = max(3, min(max_rounds, int(budget_s / max(once, 1e-4))))

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=0, iterations=1)
    return {"median_ms": benchmark.stats.stats.median * 1e3, "rounds": rounds,
            "peak_mb": peak / 2 ** 20, "peak_extra_mb": (peak - base) / 2 ** 20}


def capture_graph(fn: Callable[[], object]):
    """fn captured as a CUDA graph (after warm-up calls on a side stream, as torch.cuda.graph
    requires); call ``.replay()`` on the result. Raises if fn cannot be captured (a host sync)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
