"""muonkern.curvature on a GPU: fp32 probes against float64 CPU ground truth, and the error of the
finite-difference method, which alone runs through the fused attention kernels.

Tolerances: an fp32 HVP through a GPT accumulates relative rounding of a few 1e-6 per layer, so the
exact methods are held to 1e-4 relative; finite differences add the O(eps^(2/3)) ≈ 2.5e-5 error of
their step (muonkern.curvature.finite_diff_step) on top of the fused kernels' own rounding, held to
2e-3 for uᵀHu; each block M_ab comes from a difference of gradients along the small restricted
direction u_b, so its absolute error is held to 1e-2 of max|M| (measured on an H100: 2e-3). The
measured errors are printed (run with -s to see them).
"""
from __future__ import annotations

import pytest
import torch

from muonkern import curvature
from muonkern.models import GPT, GPTConfig, gpt_loss_fn

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.filterwarnings("ignore:muonkern exact curvature")]


def _problem(gen, dtype, device):
    """A 3-layer GPT (d=64, T=64, batch 4) with its parameters and loss in (dtype, device); the
    same model and batch for every (dtype, device) with the same generator state."""
    model = GPT(GPTConfig(vocab_size=256, context=64, n_layer=3, n_head=4, d_model=64))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if p.dim() == 1 else 0.0))
    model = model.to(device=device, dtype=dtype)
    x = torch.randint(0, 256, (4, 64), generator=gen).to(device)
    y = torch.randint(0, 256, (4, 64), generator=gen).to(device)
    params = {k: p.detach() for k, p in model.named_parameters()}
    return model, gpt_loss_fn(model, x, y), params


def test_fp32_probes_match_float64_and_finite_diff_error(gen):
    state = gen.get_state()
    _, loss64, params64 = _problem(gen, torch.float64, "cpu")
    dirs64 = [{k: 1e-2 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in params64.items()}
              for _ in range(2)]
    groups = curvature.groups_by_module(params64, 2)
    ref = curvature.directional_quadratics(loss64, params64, dirs64, groups=groups, batch_size=4)

    gen.set_state(state)
    _, loss_fn, params = _problem(gen, torch.float32, "cuda")
    dirs = [{k: t.float().cuda() for k, t in d.items()} for d in dirs64]
    scale = ref.blocks.abs().max().item()
    for method, rtol, block_rtol in (("fwd_rev", 1e-4, 1e-4), ("rev_rev", 1e-4, 1e-4), ("finite_diff", 2e-3, 1e-2)):
        got = curvature.directional_quadratics(loss_fn, params, dirs, groups=groups, method=method,
                                               batch_size=4)
        curv_err = ((got.curvature.cpu() - ref.curvature).abs() / ref.curvature.abs()).max().item()
        block_err = (got.blocks.cpu() - ref.blocks).abs().max().item() / scale
        gain_err = ((got.gain.cpu() - ref.gain).abs() / ref.gain.abs()).max().item()
        print(f"\n{method:12s} fp32 on {torch.cuda.get_device_name()}: curvature rel err {curv_err:.2e}, "
              f"blocks err / max|M| {block_err:.2e}, gain rel err {gain_err:.2e}")
        assert curv_err <= rtol and block_err <= block_rtol and gain_err <= 1e-4
        torch.testing.assert_close(got.norm_sq.cpu(), ref.norm_sq, rtol=1e-6, atol=0)


def test_finite_diff_keeps_fused_attention(gen):
    """finite_diff runs where the exact methods cannot: with only the fused SDPA kernels allowed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _, loss_fn, params = _problem(gen, torch.float32, "cuda")
    u = {k: 1e-2 * torch.randn(p.shape, generator=gen).cuda() for k, p in params.items()}
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        fd = curvature.directional_quadratics(loss_fn, params, u, method="finite_diff", blocks=False)
    exact = curvature.directional_quadratics(loss_fn, params, u, blocks=False)
    assert abs(fd.curvature.item() - exact.curvature.item()) <= 2e-3 * abs(exact.curvature.item())
