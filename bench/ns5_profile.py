"""Per-kernel GPU time of the ns5 op (torch.profiler), to see where a call's time goes.

    python bench/ns5_profile.py                      # the Gram shapes, algorithm="gram"
    python bench/ns5_profile.py --algorithm standard --shape 768x3072 --shape 1024x4096

Prints, per shape, the profiler's table over 5 calls (after 3 warm-up calls, so plans, graphs and
algorithm timing are done): each kernel's total and average CUDA time.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import muonkern  # noqa: F401  (registers the op)


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split("x"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", type=parse_shape,
                        help="e.g. 2048x8192 or 8x1024x4096 (repeatable)")
    parser.add_argument("--algorithm", default="gram", choices=["auto", "standard", "gram"])
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ns5_profile: needs a CUDA GPU")
    for shape in args.shape or [(2048, 8192), (8, 1024, 4096), (1024, 4096)]:
        G = torch.randn(*shape, device="cuda")
        for _ in range(3):
            torch.ops.muonkern.ns5(G, 5, None, 1e-7, args.algorithm)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                torch.ops.muonkern.ns5(G, 5, None, 1e-7, args.algorithm)
            torch.cuda.synchronize()
        print(f"{'x'.join(map(str, shape))}, algorithm={args.algorithm}, {args.calls} calls")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
