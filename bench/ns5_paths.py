"""Times each CUDA path of muonkern::ns5's standard iteration (fused at every cluster size, general;
algorithm="standard", which the paths belong to) and the Gram algorithm against the eager reference
with triton.testing.do_bench medians, and optionally profiles one general-path call. This is what the
tables of bench/NOTES.md were measured with.

    python bench/ns5_paths.py                  # the shapes of NOTES.md
    python bench/ns5_paths.py --profile 768x3072
    python bench/ns5_paths.py --graph 768x768 768x3072   # eager vs CUDA-graph replay (host cost)
"""
from __future__ import annotations

import argparse
import os

import torch
from triton.testing import do_bench

from measure import capture_graph
from reference_ns5 import reference_ns5

import muonkern  # noqa: F401  (registers the op)

SHAPES = ["48x128x128", "12x64x768", "1x128x600", "8x128x600", "132x64x512", "768x768", "768x3072", "1024x4096"]
VARIANTS = [("fused", "1"), ("fused", "2"), ("fused", "4"), ("fused", "8"), ("general", "0"), ("auto", "0")]


def time_us(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def standard(G):
    return torch.ops.muonkern.ns5(G, 5, None, 1e-7, "standard")


def reference(G):
    return reference_ns5(G)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shapes", nargs="*", default=SHAPES)
    parser.add_argument("--profile", metavar="SHAPE", help="torch.profiler table of one general-path call")
    parser.add_argument("--graph", action="store_true",
                        help="time the eager reference and the general path eagerly and as CUDA-graph replays")
    args = parser.parse_args()
    if args.graph:
        os.environ["MUONKERN_NS5_PATH"] = "general"
        print("| shape | impl | eager µs | graph replay µs |\n|---|---|---:|---:|")
        for shape in args.shapes:
            G = torch.randn(*map(int, shape.split("x")), device="cuda")
            for name, fn in (("reference", lambda: reference(G)), ("muonkern general", lambda: standard(G))):
                print(f"| {shape} | {name} | {time_us(fn):.1f} | {time_us(capture_graph(fn).replay):.1f} |")
        return
    if args.profile:
        G = torch.randn(*map(int, args.profile.split("x")), device="cuda")
        os.environ["MUONKERN_NS5_PATH"] = "general"
        for _ in range(3):
            standard(G)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            standard(G)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
        return
    print("| shape | path | cluster | µs | reference µs | ratio |\n|---|---|---:|---:|---:|---:|")
    for shape in args.shapes:
        G = torch.randn(*map(int, shape.split("x")), device="cuda")
        ref_us = time_us(lambda: reference(G))
        for path, cluster in VARIANTS:
            os.environ["MUONKERN_NS5_PATH"], os.environ["MUONKERN_NS5_CLUSTER"] = path, cluster
            t = time_us(lambda: standard(G))
            print(f"| {shape} | {path} | {cluster} | {t:.1f} | {ref_us:.1f} | {ref_us / t:.2f}x |")
        t = time_us(lambda: torch.ops.muonkern.ns5(G, 5, None, 1e-7, "gram"))
        print(f"| {shape} | gram (algorithm) | — | {t:.1f} | {ref_us:.1f} | {ref_us / t:.2f}x |")


if __name__ == "__main__":
    main()
