"""Calls of the fused ns5 kernel for a profiler to record: 3 calls per (shape, cluster, algorithm),
one after the other, in the order given.

    ncu --kernel-name regex:ns5_fused --launch-skip 2 --launch-count 7 --set full -o fused \
        python bench/ns5_fused_calls.py
    ncu -i fused.ncu-rep --page source --print-source sass --csv > fused_sass.csv

The default cases are 48x128x128 (the cluster the op picks: 1), 12x64x768 (picked: 8) and 12x64x768
on one block per matrix, standard iteration; launch 2 is then the first case's third call, 3-5 the
second case's, 6-8 the third's.
"""
from __future__ import annotations

import argparse
import os

import torch

import muonkern  # noqa: F401  (registers the op)

DEFAULT_CASES = ["48x128x128", "12x64x768", "12x64x768:1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", default=DEFAULT_CASES,
                        help="SHAPE[:CLUSTER], e.g. 12x64x768:8 (no cluster: the op's choice)")
    parser.add_argument("--algorithm", choices=["standard", "gram", "auto"], default="standard",
                        help="gram runs the fused kernel's Gram iteration, auto the op's pick per shape "
                             "(MUONKERN_NS5_PATH=fused)")
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    os.environ["MUONKERN_NS5_PATH"] = "fused"
    for case in args.cases:
        shape, _, cluster = case.partition(":")
        os.environ["MUONKERN_NS5_CLUSTER"] = cluster  # read at every call; "" leaves the choice to the op
        G = torch.randn(*(int(v) for v in shape.split("x")), device="cuda")
        for _ in range(args.calls):
            torch.ops.muonkern.ns5(G, algorithm=args.algorithm)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
