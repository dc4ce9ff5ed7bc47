"""A short run of every CUDA kernel of muonkern::ns5 for compute-sanitizer (memcheck, racecheck):
the fused kernel at each cluster size (both algorithms; float32 cases also with a norm outside the
deferred-scale range and with 0 steps), the wgmma kernel (cluster "0": on a compute capability 9.0
GPU the standard iteration up to 128 x 128 goes there), the general path (normalize, cuBLASLt,
finish) and the Gram iteration (the same pieces and the diagonal kernel; one wide matrix with its
scale deferred to the GEMMs), over several dtypes, orientations and odd sizes.
The multi-launch paths run three times: directly, then captured into a CUDA graph and replayed, then
replayed.

    compute-sanitizer --tool memcheck --error-exitcode 3 python scripts/sanitize_ns5.py
    compute-sanitizer --tool racecheck python scripts/sanitize_ns5.py --racecheck

--racecheck keeps cuBLAS to its heuristic's first algorithm without split-K (MUONKERN_NS5_GEMM_TUNE=0,
MUONKERN_NS5_SPLITK=0): timing 8 algorithms per GEMM shape under racecheck ran past 150 s. Our
kernels run the same either way. Racecheck still reports hazards inside cuBLAS's own kernels
(nvjet_..._splitK_..., which its heuristic picks for some shapes), never in ours: scripts/gpu_check.sh
passes the run where every report names an nvjet kernel (leaving those kernels out with
--kernel-name-exclude made the sanitizer fail on a hardware exception). --paths fused (or general)
runs one path's cases.
"""
import argparse
import os

import torch

import muonkern  # noqa: F401  (registers the op)

CASES = [  # path, cluster size, algorithm, shape, dtype
    ("fused", "1", "standard", (3, 64, 200), torch.float32),   # B X: one warp per 16-column strip
    ("fused", "1", "standard", (2, 128, 128), torch.float32),  # ... two warps per strip (Cs <= 128)
    ("fused", "2", "standard", (2, 96, 130), torch.bfloat16),
    ("fused", "4", "standard", (2, 40, 300), torch.float32),
    ("fused", "8", "standard", (1, 128, 600), torch.float16),
    ("fused", "1", "gram", (3, 64, 200), torch.float32),   # the Gram iteration on the fused kernel
    ("fused", "2", "gram", (2, 96, 130), torch.bfloat16),
    ("fused", "4", "gram", (2, 40, 300), torch.float32),
    ("fused", "8", "gram", (1, 128, 600), torch.float16),
    ("fused", "0", "standard", (3, 128, 128), torch.float32),  # the wgmma kernel (no forced cluster), 16-byte loads
    ("fused", "0", "standard", (2, 100, 72), torch.bfloat16),  # ... tall, element loads
    ("fused", "0", "standard", (2, 40, 120), torch.float16),
    ("general", "0", "standard", (2, 70, 33), torch.float32),
    ("general", "0", "standard", (300, 20), torch.bfloat16),
    ("general", "0", "standard", (2, 33, 4100), torch.float16),  # flat normalize and finish, partial chunk
    ("general", "0", "standard", (2, 32, 4100), torch.float32),  # the same in 16-byte vectors
    ("general", "0", "gram", (3, 40, 130), torch.float32),   # the last product writes fp32 out
    ("general", "0", "gram", (200, 72), torch.bfloat16),     # ... bf16 out, transposed
    ("general", "0", "gram", (2, 300, 64), torch.float32),   # ... fp32 out, transposed
    ("general", "0", "gram", (2, 48, 200), torch.float16),   # the finish kernel
    ("general", "0", "gram", (41, 4101), torch.float32),     # one wide matrix: the deferred scale, element by element
    ("general", "0", "gram", (1, 32, 4096), torch.float64),  # ... in 16-byte vectors, fp64 through finish
    ("general", "0", "gram", (2, 256, 340), torch.float32),  # X X^T and B in 4 x 4 blocks of 64, mirrored
]

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--racecheck", action="store_true", help="cuBLAS without algorithm timing and split-K")
parser.add_argument("--paths", nargs="+", choices=["fused", "general"], default=["fused", "general"])
args = parser.parse_args()
if args.racecheck:
    os.environ["MUONKERN_NS5_GEMM_TUNE"], os.environ["MUONKERN_NS5_SPLITK"] = "0", "0"
cases = [case for case in CASES if case[0] in args.paths]
# the Gram iteration's large-call pieces: the deferred scale of one wide matrix (the default, set so an
# inherited MUONKERN_NS5_DEFER_SCALE=0 cannot skip it), the blocked X X^T and B = c R R + b R (from a
# short side of 256 here, so the blocked case stays small enough for racecheck)
os.environ["MUONKERN_NS5_DEFER_SCALE"] = "1"
os.environ["MUONKERN_NS5_SPLIT_GRAM"] = os.environ["MUONKERN_NS5_BLOCK_SQUARE"] = "256"
# the wgmma kernel (the default, set so an inherited MUONKERN_NS5_WGMMA=0 cannot skip it) takes the
# fused cases of cluster "0"; a forced cluster size keeps the mma.sync kernel
os.environ["MUONKERN_NS5_WGMMA"] = "1"
for path, cluster, algorithm, shape, dtype in cases:
    os.environ["MUONKERN_NS5_PATH"], os.environ["MUONKERN_NS5_CLUSTER"] = path, cluster
    for _ in range(1 if path == "fused" else 3):
        out = torch.ops.muonkern.ns5(torch.randn(*shape, device="cuda", dtype=dtype), 5, None, 1e-7, algorithm)
        torch.cuda.synchronize()
        assert out.isfinite().all(), (path, cluster, algorithm, shape, dtype)
    if path == "fused" and dtype == torch.float32:
        # the fused kernel's other normalizations: X scaled in shared memory (a norm out of the
        # deferred range, or no step), a cluster recomputing its first Gram matrix
        for scale, steps in [(2.0 ** 40, 5), (1.0, 0)]:
            G = torch.randn(*shape, device="cuda") * scale
            out = torch.ops.muonkern.ns5(G, steps, None, 1e-7, algorithm)
            torch.cuda.synchronize()
            assert out.isfinite().all(), (path, cluster, algorithm, shape, scale, steps)
print("ns5 kernels ran:", len(cases), "cases")
