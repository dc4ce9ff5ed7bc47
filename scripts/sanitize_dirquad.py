"""Runs every CUDA kernel of muonkern::dirquad once, for compute-sanitizer:

    compute-sanitizer --tool memcheck --error-exitcode 3 python scripts/sanitize_dirquad.py
    compute-sanitizer --tool racecheck --error-exitcode 3 python scripts/sanitize_dirquad.py

Cases: every dtype, sizes on both sides of a chunk boundary, empty tensors, R = 0 and R > 4 (two
column passes), non-contiguous inputs. Each result is checked against the float64 fallback.
"""
import torch

import muonkern
from muonkern.ops.fallback import dirquad_reference

CHUNK = 1 << 15


def case(shapes, dtype, K, R, transpose=False):
    gen = torch.Generator().manual_seed(len(shapes) * 100 + K * 10 + R)
    rand = lambda s: torch.randn(s, generator=gen, dtype=torch.float64).to("cuda", dtype)  # noqa: E731
    grads = [rand(s) for s in shapes]
    dirs = [rand(s) for _ in range(K) for s in shapes]
    prods = [rand(s) for _ in range(K * R) for s in shapes]
    if transpose:
        grads, dirs, prods = ([t.mT if t.dim() == 2 else t for t in lst] for lst in (grads, dirs, prods))
    out = muonkern.dirquad(grads, dirs, prods)
    ref = dirquad_reference(grads, dirs, prods)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def main():
    assert muonkern.backend() == "cuda", muonkern.backend()
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        case([(5, 7), (CHUNK + 3,), (0,)], dtype, K=2, R=1)
    case([(CHUNK - 1,), (2 * CHUNK,), (3, 3)], torch.float32, K=1, R=0)
    case([(96, 70), (33,)], torch.float32, K=3, R=6, transpose=True)
    torch.cuda.synchronize()
    print("sanitize_dirquad: all cases ran and matched the float64 fallback")


if __name__ == "__main__":
    main()
