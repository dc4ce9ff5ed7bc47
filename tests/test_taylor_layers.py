"""The Triton kernels of the layers' Taylor rules (muonkern.taylor.triton_layers: GELU in place,
RMSNorm, head split with the rotary embedding) against nested-jvp float64 references, under
Triton's interpreter on CPU and compiled on CUDA; their dispatch; and the GPT Taylor forward with
them against the PyTorch rules on the GPU.

Tolerances (max |error| / max |reference| per output): float64 1e-12 (a few ulps of sums of a
few terms); float32 1e-5: the kernels compute in float32 where the reference is float64, and the
RMSNorm's row sums over up to 384 elements carry about √C·2⁻²⁴ ≈ 1e-6 relative error, scaled by a
few terms of r, r³ and r⁵.
"""
from __future__ import annotations

import textwrap

import pytest
import torch

from interpreter import run_interpreter
from muonkern.taylor.layers import triton_layers_apply
from taylor_cases import layer_kernel_errors

BUDGET = {"torch.float64": 1e-12, "torch.float32": 1e-5}

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def assert_rows(rows):
    assert {r[0] for r in rows} == {"gelu", "rmsnorm", "rope"}
    for rule, dtype, shape, err, nan in rows:
        assert not nan, (rule, dtype, shape, "left NaN in its output")
        assert err <= BUDGET[dtype], (rule, dtype, shape, err)


_INTERPRETER_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from taylor_cases import layer_kernel_errors
    gen = torch.Generator().manual_seed(int(sys.argv[1]))
    print(json.dumps(layer_kernel_errors(gen, "cpu")))
""")


def test_layer_kernels_under_interpreter(gen):
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    assert_rows(run_interpreter(_INTERPRETER_SCRIPT, str(seed)))


def test_dispatch(monkeypatch):
    """The kernels never run for CPU tensors; an unknown MUONKERN_TAYLOR_LAYERS value raises."""
    assert not triton_layers_apply(torch.zeros(1))
    monkeypatch.setenv("MUONKERN_TAYLOR_LAYERS", "fast")
    with pytest.raises(ValueError, match="MUONKERN_TAYLOR_LAYERS"):
        triton_layers_apply(torch.zeros(1))


@needs_gpu
def test_layer_kernels_cuda(gen):
    pytest.importorskip("triton")
    assert_rows(layer_kernel_errors(gen, "cuda"))


@needs_gpu
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_gpt_triton_layers_match_torch_rules(gen, monkeypatch, dtype, rtol):
    """The whole Taylor forward on CUDA with the Triton layer kernels against the PyTorch rules
    (MUONKERN_TAYLOR_LAYERS=torch), head dim 64, K = 3 directions, 3 × 70 tokens (not multiples
    of any block). float32: both sides carry float32 rounding, compared to the 1e-4 budget that
    the float32 GPT test holds against float64 HVPs."""
    pytest.importorskip("triton")
    from muonkern.models import GPT, GPTConfig
    from muonkern.taylor import taylor_directional
    cfg = GPTConfig(vocab_size=50, context=70, n_layer=2, n_head=2, d_model=128)
    model = GPT(cfg)
    params = {k: (p.detach().double() + 0.05 * torch.randn(p.shape, generator=gen,
                                                          dtype=torch.float64)).to("cuda", dtype)
              for k, p in model.named_parameters()}
    dirs = [{k: (0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to("cuda", dtype)
             for k, p in params.items()} for _ in range(3)]
    x, y = (torch.randint(0, cfg.vocab_size, (3, 70), generator=gen).cuda() for _ in range(2))
    got = taylor_directional(model, params, x, y, dirs)
    monkeypatch.setenv("MUONKERN_TAYLOR_LAYERS", "torch")
    want = taylor_directional(model, params, x, y, dirs)
    for g, w in zip(got, want):
        err = ((g - w) / w).abs().max().item()
        assert err <= rtol, (g, w)
