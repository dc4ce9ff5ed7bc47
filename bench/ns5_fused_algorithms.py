"""The fused kernel's two iterations side by side, per shape: what "auto" takes on CUDA
(muonkern.ops.ns5_route) and the time of the standard and the Gram iteration, each forced onto the
fused kernel (MUONKERN_NS5_PATH=fused). GPU only; fp32 Gaussian inputs, 5 steps.

    python bench/ns5_fused_algorithms.py

Times are medians of 100 calls between CUDA events (µs, host time included, as a caller sees it).
"""
import os

import torch

import muonkern
from muonkern.ops.ns5_routing import ns5_route

SHAPES = [(12, 64, 768), (3, 768, 64), (4, 128, 512), (4, 512, 128), (8, 64, 512), (132, 64, 512),
          (48, 64, 256), (16, 96, 768), (1, 128, 600), (64, 32, 128), (24, 128, 384), (2, 128, 256),
          (48, 128, 128), (48, 96, 128)]


def median_us(fn, G, calls: int = 100) -> float:
    for _ in range(5):
        fn(G)
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(G)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return sorted(times)[calls // 2]


def main() -> None:
    print("| shape | auto takes | standard µs (cluster) | gram µs (cluster) | gram / standard |")
    print("|---|---|---:|---:|---:|")
    for shape in SHAPES:
        G = torch.randn(shape, device="cuda")
        auto = ns5_route(G)
        os.environ["MUONKERN_NS5_PATH"] = "fused"
        try:
            routes = {a: ns5_route(G, algorithm=a) for a in ("standard", "gram")}
            times = {a: median_us(lambda x, a=a: muonkern.ns5(x, algorithm=a), G) for a in routes}
        finally:
            del os.environ["MUONKERN_NS5_PATH"]
        print(f"| {'×'.join(map(str, shape))} | {auto.path} {auto.algorithm} "
              f"| {times['standard']:.1f} ({routes['standard'].cluster}) | {times['gram']:.1f} ({routes['gram'].cluster}) "
              f"| {times['gram'] / times['standard']:.2f} |")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    main()
