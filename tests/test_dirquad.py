"""muonkern::dirquad (the dot products of the curvature probes) on CPU and, where present, CUDA.

Ground truth: float64 dot products. The op accumulates in float64, so products of float32 (or
narrower) elements are exact and only the additions round; recursive summation of n terms errs by
at most n·2⁻⁵³·Σ|u_i o_i| in any order, so the op and the reference differ by at most twice that.
"""
from __future__ import annotations

import re

import pytest
import torch

import muonkern
from muonkern.ops.fallback import dirquad_reference
from muonkern.ops.schemas import DIRQUAD_SCHEMA

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CHUNK = 1 << 15  # the kernels' chunk: sizes around it cross chunk boundaries
SHAPES = [(3, 5), (7,), (), (0, 4), (CHUNK - 1,), (CHUNK + 1,), (3 * CHUNK + 17,), (96, 1000)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _lists(gen, shapes, dtypes, K, R, device):
    def rand(shape, dtype):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)
    grads = [rand(s, d) for s, d in zip(shapes, dtypes)]
    directions = [rand(s, d) for _ in range(K) for s, d in zip(shapes, dtypes)]
    products = [rand(s, d) for _ in range(K * R) for s, d in zip(shapes, dtypes)]
    return grads, directions, products


def _expected(grads, directions, products):
    """(K, 2 + R, P) float64 reference and the bound Σ|u_i o_i| per entry."""
    P = len(grads)
    K, R = len(directions) // P, len(products) // len(directions)
    value = torch.empty(K, 2 + R, P, dtype=torch.float64)
    scale = torch.empty_like(value)
    for k in range(K):
        for p in range(P):
            u = directions[k * P + p].double().cpu().reshape(-1)
            others = [grads[p], directions[k * P + p]] + [products[(k * R + r) * P + p] for r in range(R)]
            for c, o in enumerate(others):
                terms = u * o.double().cpu().reshape(-1)
                value[k, c, p] = terms.sum()
                scale[k, c, p] = terms.abs().sum() * max(terms.numel(), 1)
    return value, scale


def _assert_matches(out, grads, directions, products):
    value, scale = _expected(grads, directions, products)
    assert out.dtype == torch.float64 and out.shape == value.shape
    err = (out.cpu() - value).abs()
    assert bool((err <= 2 * 2.0 ** -53 * scale + 1e-300).all()), err.max().item()


def test_schema_matches_python_definition():
    parsed = torch._C.parse_schema("muonkern::" + DIRQUAD_SCHEMA)
    assert str(parsed) == str(torch.ops.muonkern.dirquad.default._schema)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K,R", [(1, 0), (1, 1), (3, 2), (2, 5)])
def test_matches_float64_mixed_shapes_and_dtypes(gen, device, K, R):
    dtypes = [DTYPES[i % len(DTYPES)] for i in range(len(SHAPES))]
    lists = _lists(gen, SHAPES, dtypes, K, R, device)
    _assert_matches(muonkern.dirquad(*lists), *lists)


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_inputs(gen, device):
    base = [torch.randn(40, 30, generator=gen, dtype=torch.float64).to(device) for _ in range(4)]
    grads = [base[0].T, base[1][::2]]
    directions = [base[2].T, base[3][1::2]]
    products = [base[1].T, base[0][::2]]
    assert not any(t.is_contiguous() for t in grads + directions + products)
    _assert_matches(muonkern.dirquad(grads, directions, products), grads, directions, products)


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_stays_in_its_entry(gen, device):
    grads, directions, products = _lists(gen, [(5, 4), (3000,)], [torch.float32] * 2, 2, 1, device)
    products[1][17] = float("nan")           # direction 0, tensor 1
    out = muonkern.dirquad(grads, directions, products).cpu()
    assert torch.isnan(out[0, 2, 1])
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[0, 2, 1] = False
    assert torch.isfinite(out[mask]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_errors_match_the_fallback(gen, device):
    g = [torch.randn(3, 4, generator=gen).to(device), torch.randn(5, generator=gen).to(device)]
    u = [t.clone() for t in g]
    cases = [
        ([], [], [], ValueError, "grads is empty"),
        (g, u[:1], [], ValueError, "positive multiple of len"),
        (g, u, u[:1], ValueError, "multiple of K"),
        (g, [u[0].double(), u[1]], [], TypeError, "must share a dtype"),
        (g, [u[0], u[1][:4]], [], ValueError, r"directions\[1\] has shape \(4,\), grads\[1\] has shape \(5,\)"),
        (g, [u[0], u[1].to(torch.int32)], [], TypeError, "expected a real floating-point"),
        ([t.to(torch.float8_e4m3fn) for t in g], [t.to(torch.float8_e4m3fn) for t in u], [], TypeError,
         re.escape("(float16, bfloat16, float32 or float64)")),
    ]
    if device == "cuda":
        cases.append((g, [u[0].cpu(), u[1]], [], ValueError, r"directions\[0\] is on cpu, grads\[0\] is on cuda"))
    for grads, directions, products, exc, match in cases:
        with pytest.raises(exc, match=match) as got:
            muonkern.dirquad(grads, directions, products)
        with pytest.raises(exc) as ref:
            dirquad_reference(grads, directions, products)
        assert str(got.value).splitlines()[0] == str(ref.value).splitlines()[0]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(gen, device):
    lists = _lists(gen, [(6, 5), (9,)], [torch.float32, torch.float64], 2, 2, device)
    torch.library.opcheck(torch.ops.muonkern.dirquad.default, lists)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(gen, device):
    lists = _lists(gen, [(6, 5), (9,)], [torch.float32] * 2, 2, 1, device)
    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(lambda a, b, c: muonkern.dirquad(a, b, c) * 2.0, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(*lists), 2.0 * muonkern.dirquad(*lists), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_poisoned_output_deterministic_and_agrees_with_cpu(gen):
    shapes = [(384, 384), (1536, 384), (CHUNK * 2 + 5,), (11,)]
    lists = _lists(gen, shapes, [torch.float32] * 4, 4, 3, "cuda")
    # Leave NaN in the allocator's cached blocks the op will reuse: an unwritten element shows.
    for n in (4 * 5 * 4, 4 * sum(-(-torch.Size(s).numel() // CHUNK) for s in shapes) * 5):
        torch.full((n,), float("nan"), dtype=torch.float64, device="cuda")
    first = muonkern.dirquad(*lists)
    assert torch.isfinite(first).all()
    for _ in range(3):
        assert torch.equal(muonkern.dirquad(*lists), first)       # fixed summation order
    cpu = muonkern.dirquad(*[[t.cpu() for t in lst] for lst in lists])
    _assert_matches(first, *lists)
    _assert_matches(cpu, *[[t.cpu() for t in lst] for lst in lists])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_side_stream(gen):
    """The op runs on the current stream: inputs written on a side stream after a delay are seen
    (a launch or table copy on another stream would read the zeros)."""
    lists = _lists(gen, [(64, 48), (1000,)], [torch.float32] * 2, 2, 2, "cuda")
    expected = muonkern.dirquad(*lists)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        late = [[torch.zeros_like(t) for t in lst] for lst in lists]
        torch.cuda._sleep(1_000_000)
        for dst, src in zip(late, lists):
            for d, t in zip(dst, src):
                d.copy_(t)
        got = muonkern.dirquad(*late)
    side.synchronize()
    assert torch.equal(got, expected)