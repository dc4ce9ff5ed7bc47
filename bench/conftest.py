"""Timing harness and the summary tables of the benchmarks (pytest-benchmark): ns5, optimizer step,
curvature probes.

Run: `python -m pytest bench -q` (the normal test run, `python -m pytest`, collects tests/ only).
Each table is written as markdown and JSON to $MUONKERN_BENCH_OUT (default bench_results/) after
every benchmark, so a run cut short keeps the rows it measured, and printed at the end. The ns5 one:
shape, impl, median ms per call, ratio vs the reference eager (reference time / impl time, same run)
and TFLOP/s counted as 4m^2n + 2m^3 per step.
"""
from __future__ import annotations

import math
import time

import pytest
import torch

from measure import (built_table, markdown, measure_call, register_report, rotating_inputs, save_reports,
                     shape_str, time_rotating)

from muonkern.ops import ns5_args

TARGET_ROUND_S = 2e-3     # k calls per timed round, so a round lasts >= ~2 ms (CUDA is async)
TIME_PER_CASE_S = 0.6     # timed rounds per (shape, impl): about this long, 5..200 rounds
WARMUP_ROUNDS = 2

_RESULTS: list[dict] = []
_OPTIM_RESULTS: list[dict] = []
_PROBE_RESULTS: list[dict] = []


def ns5_flops(shape, steps: int = 5) -> float:
    """Per step 4 m^2 n + 2 m^3 with m the short side, n the long side; times batch."""
    return math.prod(shape[:-2]) * float(ns5_args.ns5_flops(shape[-2], shape[-1], steps, "standard"))


@pytest.fixture
def time_ns5(benchmark, request):
    """time_ns5(fn, shape, impl, device): times fn over rotating inputs and records the result, in
    the report of its test file (test_bench_ns5.py: ns5_bench, test_bench_anchors.py: anchors_bench),
    whose ratios are against that file's own reference rows."""
    report = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_bench_") + "_bench"

    def run(fn, shape, impl: str, device: str) -> float:
        inputs = rotating_inputs(shape, device)
        benchmark.group = f"{device} {shape_str(shape)}"
        benchmark.extra_info.update(impl=impl, shape=list(shape), device=device)
        timed = time_rotating(benchmark, fn, inputs, device, TARGET_ROUND_S, TIME_PER_CASE_S, WARMUP_ROUNDS)
        assert torch.isfinite(timed["first_output"]).all(), \
            f"{impl} returned non-finite values on {shape_str(shape)}"
        median_s = timed["median_s"]
        register_report(report, lambda: _ns5_built(report))
        _RESULTS.append({
            "report": report, "device": device, "shape": shape_str(shape), "impl": impl, "median_ms": median_s * 1e3,
            "min_ms": timed["min_s"] * 1e3, "calls_per_round": timed["calls_per_round"],
            "rounds": timed["rounds"], "inputs_rotated": len(inputs), "flops": ns5_flops(shape),
            "tflops": ns5_flops(shape) / median_s / 1e12,
        })
        return median_s

    return run


@pytest.fixture
def time_optimizer_step(benchmark):
    """time_optimizer_step(step, impl, extra): times step() (one optimizer step on the GPU, k steps and
    one synchronize per round) and records it with `extra` (e.g. state memory) for the step table."""

    def run(step, impl: str, extra: dict) -> float:
        for _ in range(3):  # warm-up: state allocation, plans, compilation
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        per_step = time.perf_counter() - start
        k = max(1, min(50, math.ceil(20e-3 / per_step)))
        rounds = max(5, min(50, int(2.0 / (k * per_step))))

        def timed_round():
            for _ in range(k):
                step()
            torch.cuda.synchronize()

        benchmark.group = "optimizer step"
        benchmark.extra_info.update(calls_per_round=k, impl=impl, **extra)
        benchmark.pedantic(timed_round, rounds=rounds, warmup_rounds=1, iterations=1)
        median_s = benchmark.stats.stats.median / k
        _OPTIM_RESULTS.append({"impl": impl, "median_ms": median_s * 1e3, "steps_per_round": k, **extra})
        return median_s

    return run


@pytest.fixture
def time_probe(benchmark):
    """time_probe(fn, case, impl, reference=None, per=1): times fn() on the GPU (one call and one
    synchronize per round; the calls here take milliseconds), records its peak memory beyond what
    was allocated before the call, and its ratio to the `reference` impl of the same case
    (measured earlier in the same run) for the curvature-probe table."""

    def run(fn, case: str, impl: str, reference: str | None = None, per: int = 1) -> float:
        benchmark.group = f"probe {case}"
        benchmark.extra_info.update(impl=impl, case=case, per=per)
        measured = measure_call(fn, benchmark, budget_s=TIME_PER_CASE_S * 5)
        median_ms, peak_mb, rounds = measured["median_ms"], measured["peak_extra_mb"], measured["rounds"]
        ref = next((r["median_ms"] for r in _PROBE_RESULTS if r["case"] == case and r["impl"] == reference),
                   None)
        _PROBE_RESULTS.append({"case": case, "impl": impl, "median_ms": median_ms, "per": per,
                               "per_ms": median_ms / per, "reference": reference,
                               "ratio_vs_reference": None if ref is None else median_ms / per / ref,
                               "peak_mb": peak_mb, "rounds": rounds})
        return median_ms

    return run


def pytest_configure(config):
    # One table (ours) at the end, not pytest-benchmark's own as well.
    if hasattr(config.option, "benchmark_quiet"):
        config.option.benchmark_quiet = True


def _table(results: list[dict]) -> list[dict]:
    reference = {(r["device"], r["shape"]): r["median_ms"] for r in results if r["impl"] == "reference"}
    rows = []
    for r in results:
        ref = reference.get((r["device"], r["shape"]))
        rows.append({**r, "ratio_vs_reference": ref / r["median_ms"] if ref else None})
    return rows


def _ns5_report(rows: list[dict], env: dict) -> str:
    cells = [[r["device"], r["shape"], r["impl"], f"{r['median_ms']:.4f}",
              "—" if r["ratio_vs_reference"] is None else f"{r['ratio_vs_reference']:.2f}x", f"{r['tflops']:.2f}"]
             for r in rows]
    return markdown("muonkern ns5 benchmark", env,
                     "Median per call (k calls then one synchronize per timed round); ratio = reference eager "
                     "time / this impl's time (> 1 is faster than the reference); TFLOP/s counted as "
                     "4m^2n + 2m^3 per step (m = short side).",
                     ["device", "shape (fp32)", "impl", "median ms", "ratio vs reference", "TFLOP/s"], cells)


def _optim_report(rows: list[dict], env: dict) -> str:
    ours = next((r["median_ms"] for r in rows if r["impl"] == "muonkern"), None)
    cells = [[r["impl"], f"{r['median_ms']:.3f}", f"{r['median_ms'] / ours:.2f}x" if ours else "—",
              f"{r['state_mb']:.1f}", f"{r['peak_step_mb']:.1f}"] for r in rows]
    return markdown("muonkern optimizer-step benchmark (GPT-2-small parameter set, fp32 parameters)", env,
                     "Median per step; speed-up = that impl's time / muonkern's time (same run). State MB: the "
                     "optimizer's state tensors after one step; peak MB: the most memory a step allocates beyond "
                     "parameters, gradients and state.",
                     ["impl", "median ms", "muonkern speed-up", "state MB", "peak extra MB in a step"], cells)


def _probe_report(rows: list[dict], env: dict) -> str:
    cells = [[r["case"], r["impl"], f"{r['median_ms']:.2f}", str(r["per"]), f"{r['per_ms']:.2f}",
              "—" if r["ratio_vs_reference"] is None else f"{r['ratio_vs_reference']:.2f}x "
              f"{r['reference']}", f"{r['peak_mb']:.0f}"] for r in rows]
    return markdown("muonkern multi-call benchmark (curvature probes, grouped ns5)", env,
                     "Median per call (one call and one synchronize per round). per = directions (or "
                     "dot-product sets) per call; ratio = time per direction / the named reference's time in "
                     "the same run; peak MB = memory a call allocates beyond what existed before it.",
                     ["case", "impl", "median ms", "per", "ms per", "ratio", "peak MB"], cells)


def _ns5_built(report: str):
    """The ns5 table of one test file (its rows' ratios against that file's reference rows)."""
    return built_table(_table([r for r in _RESULTS if r["report"] == report]), _ns5_report)


register_report("optim_bench", lambda: built_table(_OPTIM_RESULTS, _optim_report))
register_report("curvature_bench", lambda: built_table(_PROBE_RESULTS, _probe_report))


def pytest_runtest_logfinish(nodeid, location):
    save_reports()  # after every benchmark: a run cut short keeps what it measured


def pytest_terminal_summary(terminalreporter):
    save_reports(terminalreporter)
