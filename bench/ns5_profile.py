"""Where an ns5 call's GPU time goes: per-kernel times (torch.profiler), the idle time between the
kernels of a call, and the call's time when the host cannot hold the GPU back.

    python bench/ns5_profile.py                      # the Gram shapes, algorithm="gram"
    python bench/ns5_profile.py --algorithm standard --shape 768x3072 --shape 1024x4096
    python bench/ns5_profile.py --impl triton-gram --shape 2048x8192   # muonkern.ops.triton_gram
    python bench/ns5_profile.py --impl triton-small --shape 48x128x128 # muonkern.ops.triton_small

Per shape, after 3 warm-up calls (so plans, graphs and algorithm timing are done):
  - the profiler's table over 5 calls: each kernel's total and average CUDA time;
  - the timeline of those calls: GPU span per call (first kernel start to last kernel end), the
    kernels' busy time inside it, the idle rest and the longest gaps between kernels;
  - the time per call of 20 back-to-back calls, once as issued and once queued behind a GPU sleep
    (the host then enqueues every launch before the GPU reaches them: what remains is the GPU's own
    time, its launch gaps included), and the host's own time per call in the queued run (enqueueing
    only: the GPU cannot hold it back). A call costs about the larger of the two.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

import muonkern  # noqa: F401  (registers the op)


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split("x"))


def gpu_timeline(prof, calls: int) -> str:
    """Span, busy and idle microseconds per call from the profiler's trace of `calls` calls."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    gpu = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                 if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)
    if not gpu:
        return "no GPU events in the trace"
    span = gpu[-1][1] - gpu[0][0]
    busy = sum(end - start for start, end, _ in gpu)
    gaps = sorted(((gpu[i + 1][0] - gpu[i][1], gpu[i][2][:40], gpu[i + 1][2][:40]) for i in range(len(gpu) - 1)),
                  reverse=True)
    lines = [f"GPU events: {len(gpu)} ({len(gpu) / calls:.0f} per call); per call: span {span / calls:.1f} us, "
             f"busy {busy / calls:.1f} us, idle {(span - busy) / calls:.1f} us "
             f"(median gap {sorted(g for g, _, _ in gaps)[len(gaps) // 2]:.1f} us)"]
    lines += [f"  gap {g:7.1f} us  after {a}  before {b}" for g, a, b in gaps[:5]]
    return "\n".join(lines)


def per_call_ms(run, calls: int, preload: bool) -> tuple[float, float]:
    """(GPU ms, host ms) per call of `calls` back-to-back calls."""
    torch.cuda.synchronize()
    if preload:  # the GPU sleeps (~0.1 s) while the host enqueues everything below
        torch.cuda._sleep(200_000_000)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    host_start = time.perf_counter()
    for _ in range(calls):
        run()
    host_ms = (time.perf_counter() - host_start) * 1e3 / calls
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / calls, host_ms


IMPLS = ("op", "triton-gram", "triton-small")


def impl_call(impl: str, algorithm: str):
    """The call to profile: the op with `algorithm`, or a Triton route (5 steps, Jordan's coefficients)."""
    if impl == "op":
        return lambda G: torch.ops.muonkern.ns5(G, 5, None, 1e-7, algorithm)
    from muonkern.ops import triton_gram, triton_small
    return {"triton-gram": triton_gram.ns5_gram_symmetric, "triton-small": triton_small.ns5_small}[impl]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", type=parse_shape,
                        help="e.g. 2048x8192 or 8x1024x4096 (repeatable)")
    parser.add_argument("--algorithm", choices=["auto", "standard", "gram"],
                        help="the op's algorithm (default gram); only with --impl op")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--impl", default="op", choices=list(IMPLS),
                        help="op: torch.ops.muonkern.ns5 with --algorithm; the others: the Triton routes")
    args = parser.parse_args()
    if args.algorithm is not None and args.impl != "op":
        parser.error("--algorithm applies to --impl op only")
    args.algorithm = args.algorithm or "gram"
    if not torch.cuda.is_available():
        raise SystemExit("ns5_profile: needs a CUDA GPU")
    call = impl_call(args.impl, args.algorithm)
    for shape in args.shape or [(2048, 8192), (8, 1024, 4096), (1024, 4096)]:
        G = torch.randn(*shape, device="cuda")

        def run():
            return call(G)

        for _ in range(3):
            run()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                run()
            torch.cuda.synchronize()
        what = f"algorithm={args.algorithm}" if args.impl == "op" else args.impl
        print(f"{'x'.join(map(str, shape))}, {what}, {args.calls} calls")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
        print(gpu_timeline(prof, args.calls))
        issued, _ = per_call_ms(run, 20, preload=False)
        queued, host = per_call_ms(run, 20, preload=True)
        print(f"per call: {issued:.4f} ms as issued, {queued:.4f} ms queued behind a GPU sleep; "
              f"host enqueue {host:.4f} ms\n")


if __name__ == "__main__":
    main()
