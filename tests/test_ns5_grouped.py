"""muonkern.ns5_grouped (op muonkern::ns5_grouped): each output equals ns5 of its input, whatever the
mix of shapes, orientations, batch dims and dtypes in the list; errors name the offending tensor.
On CPU the C++ kernel computes each matrix of a batch alone, so grouped and single calls agree
bit for bit; on CUDA a larger batch may take another ns5 path (fused vs general), so the two agree
to bf16 rounding (GROUPED_CUDA_ATOL in tests/reference.py)."""
from __future__ import annotations

import pytest
import torch

import muonkern
from muonkern.ops.ns5_routing import ns5_route
from ns5_cases import EMPTY_SHAPES
from reference import EXT_VS_FALLBACK_RTOL, GROUPED_CUDA_ATOL, assert_ns5_output

# wide, tall (joins the wide group transposed), a batch of the wide shape, square, another tall
SHAPES = [(8, 16), (16, 8), (3, 8, 16), (6, 6), (12, 4), (2, 6, 6), (16, 8)]


def _inputs(gen, device, dtypes=(torch.float32,)):
    return [torch.randn(s, generator=gen).to(device, dtypes[i % len(dtypes)])
            for i, s in enumerate(SHAPES)]


def _check_equal_to_single_calls(Gs, exact, **kw):
    out = muonkern.ns5_grouped(Gs, **kw)
    assert len(out) == len(Gs)
    for G, o in zip(Gs, out):
        assert o.shape == G.shape and o.dtype == G.dtype and o.device == G.device
        assert o.is_contiguous()
        want = muonkern.ns5(G, **kw)
        if exact:
            assert torch.equal(o, want)
        else:
            torch.testing.assert_close(o.float(), want.float(), rtol=EXT_VS_FALLBACK_RTOL, atol=GROUPED_CUDA_ATOL)
    return out


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.bfloat16, torch.float64)],
                         ids=["fp32", "mixed"])
def test_equals_ns5_of_each(gen, dtypes):
    out = _check_equal_to_single_calls(_inputs(gen, "cpu", dtypes), exact=True)
    storages = {o.untyped_storage().data_ptr() for o in out}
    assert len(storages) == len(out), "outputs share memory"


def test_coefficients_steps_eps(gen):
    coeffs = [1.5, -0.5, 0.0, 2.0, -1.5, 0.5]
    _check_equal_to_single_calls(_inputs(gen, "cpu"), exact=True, steps=2, coefficients=coeffs, eps=1e-5)
    # eps shows only where it is comparable to the norm: matrices of norm eps are scaled by 1/(2 eps);
    # a dropped eps (1/eps instead) misses the float64 replica by 0.20-0.32 on these inputs of short
    # side >= 8 (`python bench/cpu_measurements.py eps-drop`), against their 0.12 budget (smaller ones have the looser BF16_RTOL_TINY)
    eps = 1e-3
    Gs = [G / torch.linalg.vector_norm(G, dim=(-2, -1), keepdim=True) * eps
          for G in _inputs(gen, "cpu") if min(G.shape[-2:]) >= 8]
    assert Gs
    for G, out in zip(Gs, muonkern.ns5_grouped(Gs, eps=eps)):
        assert_ns5_output(out, G, eps=eps)
        assert_ns5_output(muonkern.ns5(G, eps=eps), G, eps=eps)


def test_noncontiguous_inputs(gen):
    Gs = [torch.randn(16, 8, generator=gen).mT, torch.randn(8, 32, generator=gen)[:, ::2],
          torch.randn(8, 16, generator=gen)]
    assert not Gs[0].is_contiguous() and not Gs[1].is_contiguous()
    _check_equal_to_single_calls(Gs, exact=True)


def test_empty_list_and_empty_tensors(gen):
    assert muonkern.ns5_grouped([]) == []
    G = torch.randn(4, 8, generator=gen)
    empties = [torch.randn(s) for s in EMPTY_SHAPES] + [torch.randn(5, 0), torch.randn(0, 5)]
    out = muonkern.ns5_grouped([*empties, G])  # zero-sized sides too: as ns5 of each
    assert [o.shape for o in out[:-1]] == [e.shape for e in empties]
    assert all(torch.equal(o, muonkern.ns5(e)) for o, e in zip(out, empties))
    assert torch.equal(out[-1], muonkern.ns5(G))
    # an empty list still checks the options
    with pytest.raises(ValueError, match="steps must be >= 0"):
        muonkern.ns5_grouped([], steps=-1)
    with pytest.raises(ValueError, match="algorithm must be"):
        muonkern.ns5_grouped([], algorithm="fast")


@pytest.mark.parametrize("bad,err,match", [
    ([torch.randn(4, 4), torch.randn(4)], ValueError, r"Gs\[1\].*rank >= 2"),
    ([torch.randint(0, 3, (4, 4))], TypeError, r"Gs\[0\].*floating-point"),
], ids=["vector", "int"])
def test_errors_name_the_tensor(bad, err, match):
    with pytest.raises(err, match=match):
        muonkern.ns5_grouped(bad)


def test_bad_coefficients():
    with pytest.raises(ValueError, match="3\\*steps"):
        muonkern.ns5_grouped([torch.randn(4, 8)], steps=2, coefficients=[1.0, 2.0])


def test_opcheck(gen):
    Gs = _inputs(gen, "cpu")
    torch.library.opcheck(torch.ops.muonkern.ns5_grouped.default, (Gs, 5, None, 1e-7))


def test_fake_tensors_give_shapes(gen):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        Gs = [torch.empty(s) for s in SHAPES]
        out = torch.ops.muonkern.ns5_grouped(Gs, 5, None, 1e-7)
    assert [tuple(o.shape) for o in out] == SHAPES


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_ns5_of_each(gen):
    Gs = _inputs(gen, "cuda", (torch.float32, torch.bfloat16))
    _check_equal_to_single_calls(Gs, exact=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_takes_the_route_of_each(gen):
    """Where "auto" runs the Gram iteration on the fused kernel (64 x 768, wide and tall, on clusters
    of 8 blocks at these batch sizes, 1 to 3 matrices), a group runs it too, and the outputs equal single calls bit for
    bit: same algorithm, same cluster, and the fused kernel computes each matrix alone."""
    Gs = [torch.randn(s, generator=gen).cuda() for s in [(64, 768), (2, 64, 768), (768, 64)]]
    if muonkern.backend() == "cuda":  # another backend runs CUDA tensors on the fallback
        for G in Gs:
            assert ns5_route(G) == ("fused", "gram", 8), tuple(G.shape)
    _check_equal_to_single_calls(Gs, exact=True)


def test_inside_torch_compile_fullgraph(gen):
    """The fake kernel lets a compiled graph hold the op whole (no graph break)."""
    Gs = _inputs(gen, "cpu")[:3]
    compiled = torch.compile(lambda xs: torch.ops.muonkern.ns5_grouped(xs, 5, None, 1e-7),
                             fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(Gs), muonkern.ns5_grouped(Gs)):
        assert torch.equal(got, want)
