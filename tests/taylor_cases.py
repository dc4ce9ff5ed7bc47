"""Inputs and the error measure shared by the Taylor-attention tests on CPU and CUDA."""
from __future__ import annotations

import torch

F64 = torch.float64


def attention_inputs(gen, K, B, H, T, D, dtype=F64, device="cpu"):
    """q, k, v (B, H, T, D) and six derivative tensors (K, B, H, T, D), Gaussian (drawn in
    float64 on the CPU generator, then cast and moved)."""
    prim = [torch.randn(B, H, T, D, generator=gen, dtype=F64) for _ in range(3)]
    tan = [torch.randn(K, B, H, T, D, generator=gen, dtype=F64) for _ in range(6)]
    return tuple(t.to(device, dtype) for t in (*prim, *tan))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|, in float64."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max())


def curve_derivatives(g, like: torch.Tensor):
    """(g(0), g'(0), g''(0)) of a tensor-valued curve g(t), by nested forward-mode jvp (float64
    references for the Taylor rules, independent of them)."""
    t0, one = torch.zeros((), dtype=like.dtype), torch.ones((), dtype=like.dtype)

    def first(t):
        return torch.func.jvp(g, (t,), (one,))[1]
    return g(t0), first(t0), torch.func.jvp(first, (t0,), (one,))[1]


def layer_kernel_errors(gen, device: str) -> list:
    """[rule, dtype, shape, max relative error, NaN left] of each Triton layer kernel
    (muonkern.taylor.triton_layers) against nested-jvp float64 references, on shapes that are
    not multiples of the kernels' blocks, outputs (where the kernel takes them) poisoned with NaN.
    Imports the kernels when called (under the interpreter, after TRITON_INTERPRET is set)."""
    import torch.nn.functional as F

    from muonkern.models.gpt import apply_rope, rope_cos_sin
    from muonkern.taylor import triton_layers as tk

    def jet(shape, K, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=F64),
                torch.randn(K, *shape, generator=gen, dtype=F64),
                torch.randn(K, *shape, generator=gen, dtype=F64))

    def along(f, x, d, dd, k, extra=()):
        """Orders of f(x + t ẋ_k + t²/2 ẍ_k, *(e + t·u_k for (e, u) in extra))."""
        return curve_derivatives(lambda t: f(x + t * d[k] + 0.5 * t * t * dd[k],
                                             *(e + t * u[k] for e, u in extra)), x)

    def reference(f, x, d, dd, extra=()):
        orders = [along(f, x, d, dd, k, extra) for k in range(d.shape[0])]
        return (orders[0][0], torch.stack([o[1] for o in orders]),
                torch.stack([o[2] for o in orders]))

    def rmsnorm(x, w, eps=1e-5):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def record(rule, dtype, shape, got, want):
        errs = [rel_err(g, w) for g, w in zip(got, want)]
        rows.append([rule, str(dtype), list(shape), max(errs),
                     any(bool(g.isnan().any()) for g in got)])

    rows = []
    for dtype in (torch.float64, torch.float32):
        def put(*ts):
            return [t.to(device, dtype) for t in ts]

        for shape, K in (((5, 333), 3), ((2, 700), 1)):
            x, d, dd = jet(shape, K, scale=2.0)
            want = reference(F.gelu, x, d, dd)
            got = put(x, d, dd)
            tk.gelu_jet_(*got)
            record("gelu", dtype, shape, got, want)
        for shape, K in (((7, 24), 3), ((2, 5, 384), 2)):
            x, d, dd = jet(shape, K)
            w = 1.0 + 0.3 * torch.randn(shape[-1], generator=gen, dtype=F64)
            U = torch.randn(K, shape[-1], generator=gen, dtype=F64)
            want = reference(rmsnorm, x, d, dd, extra=((w, U),))
            out = [torch.full(t.shape, float("nan"), dtype=dtype, device=device) for t in want]
            got = tk.rmsnorm_jet(*put(x, d, dd, w, U), eps=1e-5, out=out)
            record("rmsnorm", dtype, shape, got, want)
        for lead, T, H, D, K in (((2,), 37, 3, 16, 2), ((), 5, 1, 64, 1)):
            x, d, dd = jet((*lead, T, H * D), K)
            cos, sin = rope_cos_sin(T, D, 10000.0, device="cpu", dtype=F64)

            def split_rope(t):
                return apply_rope(t.reshape(*t.shape[:-1], H, D).transpose(-3, -2), cos, sin)
            want = [split_rope(t) for t in (x, d, dd)]   # linear in t: orders map one to one
            got = [tk.rope_heads(t, H, *put(cos, sin),
                                 out=torch.full(w.shape, float("nan"), dtype=dtype, device=device))
                   for t, w in zip(put(x, d, dd), want)]
            record("rope", dtype, (*lead, T, H, D), got, want)
    return rows
