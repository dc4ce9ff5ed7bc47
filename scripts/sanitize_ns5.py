"""A short run of every CUDA kernel of muonkern::ns5 for compute-sanitizer (memcheck, racecheck):
the fused kernel at each cluster size and the general path (normalize, cuBLASLt, finish), over
several dtypes, orientations and odd sizes.

    compute-sanitizer --tool memcheck --error-exitcode 3 python scripts/sanitize_ns5.py
    compute-sanitizer --tool racecheck --error-exitcode 3 python scripts/sanitize_ns5.py
"""
import os

import torch

import muonkern  # noqa: F401  (registers the op)

CASES = [  # path, cluster size, shape, dtype
    ("fused", "1", (3, 64, 200), torch.float32),
    ("fused", "2", (2, 96, 130), torch.bfloat16),
    ("fused", "4", (2, 40, 300), torch.float32),
    ("fused", "8", (1, 128, 600), torch.float16),
    ("general", "0", (2, 70, 33), torch.float32),
    ("general", "0", (300, 20), torch.bfloat16),
]

for path, cluster, shape, dtype in CASES:
    os.environ["MUONKERN_NS5_PATH"], os.environ["MUONKERN_NS5_CLUSTER"] = path, cluster
    out = torch.ops.muonkern.ns5(torch.randn(*shape, device="cuda", dtype=dtype))
    torch.cuda.synchronize()
    assert out.isfinite().all(), (path, cluster, shape, dtype)
print("ns5 kernels ran:", len(CASES), "cases")
