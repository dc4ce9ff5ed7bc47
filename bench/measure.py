"""Shared by the benchmarks: inputs, timing (rounds of k calls; one call with its peak memory),
and the tables they write (markdown and JSON in $MUONKERN_BENCH_OUT, default bench_results/)."""
from __future__ import annotations

import itertools
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

import muonkern

MAX_ROTATING_INPUTS = 16


def shape_str(shape) -> str:
    return "x".join(map(str, shape))


def rotating_inputs(shape, device: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> list:
    """Fresh Gaussian inputs (never zeros); several for small shapes, aiming at twice the L2 cache
    together, capped at MAX_ROTATING_INPUTS: below ~3 MiB an input (768² fp32 is 2.25 MiB) the 16
    of them fit in an H100's 50 MiB L2, so those shapes may still find their input there, for the
    op and the reference alike."""
    nbytes = dtype.itemsize * math.prod(shape)
    l2 = 50 << 20
    if device == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", l2) or l2
    count = max(1, min(MAX_ROTATING_INPUTS, math.ceil(2 * l2 / nbytes)))
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(device, dtype) for _ in range(count)]


def sync_for(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _per_call_ms(run: Callable[[], object], calls: int, rounds: int) -> list[float]:
    """run() timed between CUDA events `rounds` times, each time divided by the `calls` it makes."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return times


def back_to_back_ms(fn: Callable[[], object], calls: int = 20, rounds: int = 5) -> list[float]:
    """The time per call of each of `rounds` rounds of `calls` back-to-back calls between CUDA
    events, after one warm-up call: the GPU's time where it exceeds the host's, the host's where the
    calls are launch-bound."""
    fn()
    torch.cuda.synchronize()

    def run():
        for _ in range(calls):
            fn()
    return _per_call_ms(run, calls, rounds)


def graph_replay_ms(fn: Callable[[], object], calls: int = 20, rounds: int = 5) -> list[float]:
    """The time per call of each of `rounds` replays of a CUDA graph of `calls` calls: the GPU's
    time alone. Warm-up calls run on the capture stream first, so that state kept per stream (a
    Triton kernel's workspace) exists before the capture."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(calls):
            fn()
    return _per_call_ms(graph.replay, calls, rounds)


def time_rotating(benchmark, fn, inputs: list, device: str, target_round_s: float = 2e-3,
                  time_per_case_s: float = 0.6, warmup_rounds: int = 2) -> dict:
    """fn over the inputs in turn, k calls then one synchronize per timed round (k such that a
    round lasts >= target_round_s: CUDA is asynchronous), about time_per_case_s of 5..200 rounds.
    The first call (compilation, autotuning, plans) is not timed; a copy of its output is returned
    (CUDA-graphed implementations overwrite their output at the next call)."""
    sync = sync_for(device)
    cycle = itertools.cycle(inputs)
    out = fn(inputs[0]).clone()
    sync()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < 0.05:
        fn(next(cycle))
        calls += 1
    sync()
    per_call = (time.perf_counter() - start) / calls
    k = max(1, min(2000, math.ceil(target_round_s / per_call)))
    rounds = max(5, min(200, int(time_per_case_s / (k * per_call))))

    def timed_round():
        for _ in range(k):
            fn(next(cycle))
        sync()

    benchmark.extra_info.update(calls_per_round=k)
    benchmark.pedantic(timed_round, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    stats = benchmark.stats.stats
    return {"first_output": out, "median_s": stats.median / k, "min_s": stats.min / k,
            "calls_per_round": k, "rounds": rounds}


def measure_call(fn: Callable[[], object], benchmark, budget_s: float, max_rounds: int = 50) -> dict:
    """Warm-up call, one call for peak memory (beyond what was allocated before it), then timed
    rounds of one call and one synchronize through pytest-benchmark, about ``budget_s`` in all."""
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


def environment() -> dict:
    env = {"torch": torch.__version__, "muonkern_backend": muonkern.backend(), "python": platform.python_version(),
           "ns5_path": os.environ.get("MUONKERN_NS5_PATH", "auto")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def markdown(title: str, env: dict, note: str, columns: list[str], cells: list[list[str]]) -> str:
    aligns = ["---" if i < columns.index("median ms") else "---:" for i in range(len(columns))]
    lines = [f"# {title}", "", ", ".join(f"{k}: {v}" for k, v in env.items()), "", note, "",
             "| " + " | ".join(columns) + " |", "|" + "|".join(aligns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


# The run's tables by name, each a builder returning (markdown, JSON payload), or None while it has no
# rows. conftest.py rewrites their files after every benchmark, so a run stopped midway (a timeout, a
# machine taken back) keeps the rows it measured, and prints them once, at the end.
_REPORTS: dict[str, Callable[[], tuple[str, dict] | None]] = {}


def built_table(rows: list[dict], render: Callable[[list[dict], dict], str],
                env: Callable[[], dict] = environment) -> tuple[str, dict] | None:
    """A report builder's result for `rows`: the markdown render(rows, env) and the JSON payload
    {environment, results}; None while there are no rows."""
    if not rows:
        return None
    environment_now = env()
    return render(rows, environment_now), {"environment": environment_now, "results": rows}


def register_report(name: str, build: Callable[[], tuple[str, dict] | None]) -> None:
    """Adds table NAME (NAME.md and NAME.json) to the run's reports; the first registration stands."""
    _REPORTS.setdefault(name, build)


def save_reports(terminalreporter=None) -> None:
    """Writes every table that has rows to $MUONKERN_BENCH_OUT (default bench_results/), and prints
    each one where a terminal reporter is given (the end of the run)."""
    out_dir = Path(os.environ.get("MUONKERN_BENCH_OUT", "bench_results"))
    for name, build in _REPORTS.items():
        built = build()
        if built is None:
            continue
        text, payload = built
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.md").write_text(text)
        (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
        if terminalreporter is not None:
            terminalreporter.write_sep("=", name)
            for line in text.splitlines():
                terminalreporter.write_line(line)
            terminalreporter.write_line(f"written to {out_dir / name}.md and .json")
