"""muonkern.taylor on CUDA: the Triton Taylor-attention kernel against the float64 fallback, and
the GPT Taylor forward in float32 on the GPU against float64 HVPs on the CPU.

Skipped as a whole without a CUDA GPU (or without triton).

Tolerances (relative: max |error| / max |reference| per output):
* float32 inputs: 1e-4 (the kernels' products run as tf32x3, float32 accuracy on tensor cores);
* bfloat16 inputs: 3e-2 against float64 on the same bf16-rounded inputs. The kernel rounds the
  softmax weights and their derivatives to bf16 before the value products (as flash attention
  does; 2⁻⁸ ≈ 4e-3 each) and writes bf16 outputs; second derivatives sum several such terms.
"""
from __future__ import annotations

import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from muonkern import curvature  # noqa: E402
from muonkern.models import GPT, GPTConfig, exact_attention, gpt_loss_fn  # noqa: E402
from muonkern.taylor import (taylor_attention, taylor_attention_blocked,  # noqa: E402
                             taylor_directional)
from muonkern.taylor.registration import triton_applies  # noqa: E402
from muonkern.taylor.triton_attention import taylor_attention_triton  # noqa: E402
from taylor_cases import attention_inputs, rel_err  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*math SDPA backend:UserWarning")

RTOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def inputs(gen, K, B, H, T, D, dtype):
    return list(attention_inputs(gen, K, B, H, T, D, dtype, device="cuda"))


# the cases the kernels promise, written out (not imported from the registration, so that
# shrinking its TRITON_CASES fails here)
TRITON_CASES = [(64, torch.float32), (64, torch.bfloat16), (128, torch.bfloat16)]


@pytest.mark.parametrize("D,dtype", TRITON_CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("T", [1, 77, 512, 2048])
def test_triton_matches_float64(gen, T, D, K, dtype):
    B, H = (2, 3) if T <= 512 else (1, 2)
    args = inputs(gen, K, B, H, T, D, dtype)
    assert triton_applies(args[0])
    # float64 reference on the same (rounded) inputs, by the blocked fallback on the GPU
    want = taylor_attention_blocked(*(t.double() for t in args), block_size=256)
    got = taylor_attention_triton(*args)
    via_op = taylor_attention(*args)
    for name, a, b, c in zip(("o", "od", "odd"), got, want, via_op):
        assert a.dtype == dtype and a.shape == b.shape
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, c), f"{name}: the op did not run the Triton kernel"
        err = rel_err(a, b)
        print(f"\n{name} T={T} D={D} K={K} {dtype}: relative error {err:.2e}")   # -s shows them
        assert err <= RTOL[dtype], f"{name}: relative error {err:.3e} > {RTOL[dtype]:.0e}"


def test_triton_scale_and_noncontiguous(gen):
    K, B, H, T, D = 3, 2, 2, 300, 64
    prim = [torch.randn(B, T, H, D, generator=gen).cuda().transpose(1, 2) for _ in range(3)]
    tan = [torch.randn(K, B, T, H, D, generator=gen).cuda().transpose(2, 3) for _ in range(6)]
    got = taylor_attention(*prim, *tan, scale=0.3)
    want = taylor_attention_blocked(*(t.double() for t in (*prim, *tan)), scale=0.3)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= RTOL[torch.float32]


def test_fallback_dtypes_and_dims_on_cuda(gen):
    """float64, float32 at head dim 128 and other head dims run the blocked fallback on CUDA."""
    for dtype, D in ((torch.float64, 64), (torch.float32, 128), (torch.float32, 48)):
        args = inputs(gen, 2, 1, 2, 40, D, dtype)
        assert not triton_applies(args[0])
        got = taylor_attention(*args)
        want = taylor_attention_blocked(*(t.cpu().double() for t in args))
        for a, b in zip(got, want):
            assert rel_err(a, b) <= (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("tie,d_model,n_head", [(True, 128, 2), (False, 256, 2)])
def test_gpt_float32_cuda_matches_float64_hvp(gen, tie, d_model, n_head):
    """Head dims 64 and 128 (the Triton kernel), float32 on the GPU, against the exact
    float64 HVP path (muonkern.curvature, forward-over-reverse) on the CPU."""
    cfg = GPTConfig(vocab_size=64, context=96, n_layer=2, n_head=n_head, d_model=d_model,
                    tie_embeddings=tie)
    model = GPT(cfg).double()
    params = {k: p.detach() + 0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
              for k, p in model.named_parameters()}
    dirs = [{k: torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1
             for k, p in params.items()} for _ in range(3)]
    x = torch.randint(0, cfg.vocab_size, (2, 96), generator=gen)
    y = torch.randint(0, cfg.vocab_size, (2, 96), generator=gen)
    loss_fn = gpt_loss_fn(model, x, y)
    with exact_attention():
        ref = curvature.directional_quadratics(loss_fn, params, dirs, groups={"all": list(params)})
    model32 = GPT(cfg).cuda()
    p32 = {k: v.float().cuda() for k, v in params.items()}
    d32 = [{k: v.float().cuda() for k, v in u.items()} for u in dirs]
    loss, first, second = taylor_directional(model32, p32, x.cuda(), y.cuda(), d32)
    assert math.isclose(float(loss), float(loss_fn(params)), rel_tol=1e-5)
    for got, want in ((first, ref.gain), (second, ref.curvature)):
        err = ((got.cpu() - want) / want).abs().max().item()
        assert err <= 1e-4, (got, want)
