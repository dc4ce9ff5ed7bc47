"""Runs the Triton Taylor-attention kernels once per supported case, for compute-sanitizer:

    compute-sanitizer --tool memcheck --error-exitcode 3 python scripts/sanitize_taylor.py
    compute-sanitizer --tool racecheck --error-exitcode 3 python scripts/sanitize_taylor.py

Cases: every (head dim, dtype) the kernels serve, a sequence length that is not a multiple of the
block size, several directions, and a non-contiguous layout. Each result is checked against the
float64 blocked fallback.
"""
import torch

from muonkern.taylor import taylor_attention_blocked
from muonkern.taylor.registration import TRITON_CASES, triton_applies
from muonkern.taylor.triton_attention import taylor_attention_triton


def case(D, dtype, K, B, H, T, transpose=False):
    gen = torch.Generator().manual_seed(D + K + T)
    shape = (B, T, H, D) if transpose else (B, H, T, D)
    prim = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    tan = [torch.randn((K, *shape), generator=gen, dtype=torch.float64) for _ in range(6)]
    args = [t.to("cuda", dtype) for t in (*prim, *tan)]
    if transpose:
        args = [t.transpose(-3, -2) for t in args]
    assert triton_applies(args[0])
    got = taylor_attention_triton(*args)
    want = taylor_attention_blocked(*(t.double() for t in args), block_size=64)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(got, want):
        err = float((a.double() - b).abs().max() / b.abs().max())
        assert err <= tol, (D, dtype, err)


def main():
    for D, dtype in TRITON_CASES:
        case(D, dtype, K=2, B=1, H=2, T=77)
    case(64, torch.float32, K=3, B=2, H=2, T=130, transpose=True)
    torch.cuda.synchronize()
    print("sanitize_taylor: all cases ran and matched the float64 fallback")


if __name__ == "__main__":
    main()
