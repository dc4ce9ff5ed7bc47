"""One optimizer step for the GPT-2-small (124M) parameter set on the GPU, side by side:

  muonkern          muonkern.optim.Muon (hidden matrices: Muon, batched per shape; the rest: AdamW)
  keller            KellerJordan/Muon's SingleDeviceMuonWithAuxAdam, loaded from the file named by
                    $MUONKERN_KELLER_MUON (its muon.py; not shipped with muonkern: skipped without it)
  torch             torch.optim.Muon on the hidden matrices + torch.optim.AdamW (foreach) on the rest

All take lr 0.02 / momentum 0.95 / Nesterov for matrices and AdamW lr 3e-4, betas (0.9, 0.95) for
the rest, no weight decay. Gradients are fresh Gaussians (never zeros), fixed between steps.

    MUONKERN_KELLER_MUON=/path/to/muon.py python -m pytest bench/test_bench_optim.py -q
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from muonkern.optim import Muon

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: no CUDA GPU")

D, LAYERS, VOCAB, CONTEXT = 768, 12, 50257, 1024


def gpt2_small_parameters(seed: int = 0) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(hidden matrices, everything else) of GPT-2 small, with gradients; the head is tied to wte."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def param(*shape):
        p = torch.nn.Parameter(torch.randn(*shape, device="cuda", generator=gen) * 0.02)
        p.grad = torch.randn(*shape, device="cuda", generator=gen)
        return p

    hidden, other = [], [param(VOCAB, D), param(CONTEXT, D)]
    for _ in range(LAYERS):
        hidden += [param(3 * D, D), param(D, D), param(4 * D, D), param(D, 4 * D)]
        other += [param(D), param(D), param(3 * D), param(D), param(D), param(D), param(4 * D), param(D)]
    return hidden, other + [param(D), param(D)]


def _keller_module():
    path = os.environ.get("MUONKERN_KELLER_MUON")
    if not path or not os.path.exists(path):
        pytest.skip("set MUONKERN_KELLER_MUON to KellerJordan/Muon's muon.py to compare with it")
    spec = importlib.util.spec_from_file_location("keller_muon", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_step(impl: str, hidden, other):
    if impl == "muonkern":
        opt = Muon([{"params": hidden, "use_muon": True}, {"params": other, "use_muon": False}],
                   lr=0.02, momentum=0.95, adamw_lr=3e-4, adamw_betas=(0.9, 0.95))
        return [opt], opt.step
    if impl == "keller":
        module = _keller_module()
        opt = module.SingleDeviceMuonWithAuxAdam([
            dict(params=hidden, use_muon=True, lr=0.02, momentum=0.95, weight_decay=0),
            dict(params=other, use_muon=False, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0)])
        return [opt], opt.step
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("this torch has no torch.optim.Muon")
    muon = torch.optim.Muon(hidden, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0)
    adamw = torch.optim.AdamW(other, lr=3e-4, betas=(0.9, 0.95), weight_decay=0, foreach=True)

    def step():
        muon.step()
        adamw.step()

    return [muon, adamw], step


@pytest.mark.parametrize("impl", ["muonkern", "keller", "torch"])
def test_optimizer_step_gpt2_small(time_optimizer_step, impl):
    hidden, other = gpt2_small_parameters()
    optimizers, step = make_step(impl, hidden, other)
    step()
    torch.cuda.synchronize()
    state_bytes = sum(t.numel() * t.element_size() for opt in optimizers for s in opt.state.values()
                      for t in s.values() if isinstance(t, torch.Tensor))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - base
    assert all(torch.isfinite(p).all() for p in hidden + other)
    time_optimizer_step(step, impl, {"state_mb": state_bytes / 2**20, "peak_step_mb": peak_extra / 2**20,
                                     "parameters_m": sum(p.numel() for p in hidden + other) / 1e6})
