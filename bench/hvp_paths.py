"""One Hessian-vector product through the 11M GPT (batch 32x256, fp32, math attention) by each
route, and one direction's uᵀHu by Taylor mode, timed: wall time of eager calls, the GPU kernels'
time (profiler) and the time of a CUDA-graph replay of the same call: the measurements behind the
curvature notes in README.md (single-direction forward-over-reverse is host-bound, double backward
is not).

    python bench/hvp_paths.py
"""
from __future__ import annotations

import time
import warnings

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from measure import capture_graph

from muonkern import curvature
from muonkern.models import GPT, GPTConfig, gpt_loss_fn
from muonkern.taylor import taylor_directional


def wall_ms(fn, calls: int = 6) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def gpu_ms(fn) -> float:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3


def graph_replay_ms(fn) -> str:
    """Time of replaying fn captured as a CUDA graph, or why it could not be captured."""
    try:
        graph = capture_graph(fn)
    except Exception as e:  # noqa: BLE001  (a host sync in fn: reported, not fatal)
        return f"not capturable ({type(e).__name__})"
    return f"{wall_ms(graph.replay):7.1f} ms"


def main() -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("small")).cuda()
    x, y = (torch.randint(0, model.config.vocab_size, (32, 256), device="cuda") for _ in range(2))
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
              "rev_rev": lambda: curvature.hvp(loss_fn, params, u, method="rev_rev"),
              "taylor (uᵀHu, no HVP)": lambda: taylor_directional(model, params, x, y, u)}
    for name, fn in routes.items():
        print(f"{name:24s} wall {wall_ms(fn):7.1f} ms   GPU kernels {gpu_ms(fn):7.1f} ms   "
              f"graph replay {graph_replay_ms(fn)}", flush=True)


if __name__ == "__main__":
    main()
