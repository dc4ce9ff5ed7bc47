"""Runs each Triton kernel of the layers' Taylor rules (muonkern.taylor.triton_layers) on a few
shapes, for compute-sanitizer:

    compute-sanitizer --tool memcheck --error-exitcode 3 python scripts/sanitize_taylor_layers.py
    compute-sanitizer --tool racecheck --error-exitcode 3 python scripts/sanitize_taylor_layers.py

Sizes that are not multiples of the blocks (a partial GELU block, RMSNorm rows of 24 and 384,
37 positions of rotary embedding), several directions, float32 and float64; each result is
checked against the PyTorch rules (muonkern.taylor.layers) in float64 on the CPU.
"""
import torch

from muonkern.models.gpt import rope_cos_sin
from muonkern.taylor import layers, triton_layers
from muonkern.taylor.layers import Jet


def jet(gen, shape, K):
    return Jet(torch.randn(*shape, generator=gen, dtype=torch.float64),
               torch.randn(K, *shape, generator=gen, dtype=torch.float64),
               torch.randn(K, *shape, generator=gen, dtype=torch.float64))


def check(name, dtype, got, want):
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(got, want):
        err = float((a.double().cpu() - b).abs().max() / b.abs().max())
        assert err <= tol, (name, dtype, err)


def main():
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        h = jet(gen, (3, 1100), K=3)
        got = [t.to("cuda", dtype, copy=True) for t in h]
        triton_layers.gelu_jet_(*got)
        check("gelu", dtype, got, layers.gelu_(h))
        for C, K in ((24, 3), (384, 2)):
            h = jet(gen, (2, 9, C), K)
            w = 1.0 + 0.3 * torch.randn(C, generator=gen, dtype=torch.float64)
            U = torch.randn(K, C, generator=gen, dtype=torch.float64)
            got = triton_layers.rmsnorm_jet(*(t.to("cuda", dtype) for t in (*h, w, U)), eps=1e-5)
            check("rmsnorm", dtype, got, layers.rmsnorm(h, w, U, 1e-5))
        h = jet(gen, (2, 37, 3 * 64), K=2)
        cos, sin = rope_cos_sin(37, 64, dtype=torch.float64)
        got = triton_layers.rope_heads_jet(*(t.to("cuda", dtype) for t in h), 3,
                                           cos.to("cuda", dtype), sin.to("cuda", dtype))
        check("rope", dtype, got, layers.rope_heads(h, 3, cos, sin))
    torch.cuda.synchronize()
    print("sanitize_taylor_layers: all kernels ran and matched the PyTorch rules")


if __name__ == "__main__":
    main()
