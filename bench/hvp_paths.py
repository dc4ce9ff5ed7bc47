"""One Hessian-vector product through the 11M GPT (batch 32x256, fp32, math attention) by each
route, timed, plus a profile of host vs GPU time: the measurements behind the curvature notes in
README.md (single-direction forward-over-reverse is host-bound).

    python bench/hvp_paths.py
"""
from __future__ import annotations

import time
import warnings

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from muonkern import curvature
from muonkern.models import GPT, GPTConfig, gpt_loss_fn


def main() -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("small")).cuda()
    x, y = (torch.randint(0, 256, (32, 256), device="cuda") for _ in range(2))
    loss_fn = gpt_loss_fn(model, x, y)
    params = {k: p.detach() for k, p in model.named_parameters()}
    u = {k: 1e-3 * torch.randn_like(p) for k, p in params.items()}
    grad_fn = torch.func.grad(loss_fn)

    def leaves():
        return {k: t.detach().requires_grad_(True) for k, t in params.items()}

    def gradient():
        p = leaves()
        with sdpa_kernel(SDPBackend.MATH):
            return torch.autograd.grad(loss_fn(p), list(p.values()))

    def torch_func():
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(grad_fn, (params,), (u,))[1]

    def forward_ad():  # dual parameters through autograd.grad: forward-over-reverse without torch.func
        p = leaves()
        with sdpa_kernel(SDPBackend.MATH), fwAD.dual_level():
            g = torch.autograd.grad(loss_fn({k: fwAD.make_dual(p[k], u[k]) for k in p}), list(p.values()))
            return [fwAD.unpack_dual(t).tangent for t in g]

    routes = {"gradient": gradient, "torch.func jvp of grad": torch_func, "forward_ad": forward_ad,
              "rev_rev": lambda: curvature.hvp(loss_fn, params, u, method="rev_rev")}
    for name, fn in routes.items():
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(6):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / 6 * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        gpu = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
        print(f"{name:24s} wall {wall:7.1f} ms   GPU kernels {gpu:7.1f} ms")


if __name__ == "__main__":
    main()
