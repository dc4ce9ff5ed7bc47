"""muonkern::ns5 on CPU tensors, whichever backend serves them (C++ kernel or Python fallback).

Ground truth is the float64 replica of the iteration (reference.ns5_float64); budgets and their
justification are in reference.py.
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import muonkern
from muonkern.ops.schemas import NS5_SCHEMA
from ns5_cases import (BATCH_DIM_SHAPES, DTYPES, EMPTY_SHAPES, ERROR_CASES, ERROR_IDS, ORIENTATION_SHAPES,
                       check_error, check_noncontiguous, check_nonfinite_isolated, check_zero_matrices, ns5,
                       noncontiguous_views, relative_difference, shape_id)
from reference import (EXT_VS_FALLBACK_RTOL, JORDAN, NORMALIZE_RTOL, ORTHO_TOL, POLAR_EXPRESS, POLAR_RTOL,
                       assert_ns5_output, assert_singular_values_in_band, randn)


@pytest.mark.skipif(os.environ.get("MUONKERN_REQUIRE_EXTENSION") != "1",
                    reason="MUONKERN_REQUIRE_EXTENSION=1 is not set (CI sets it)")
def test_extension_is_loaded():
    """CI builds the extension: a broken build must not pass by falling back to pure PyTorch, and on
    a GPU machine a build without the CUDA kernels must not pass by running the fallback there."""
    assert muonkern.backend() != "fallback", "the compiled extension muonkern._C did not load"
    if torch.cuda.is_available():
        assert muonkern.backend() == "cuda", "the extension was built without its CUDA kernels"


def test_package_coefficients_equal_the_published_values():
    """The package's schedules against the independent literals of tests/reference.py (the
    optimizer tests use the package's constants on both sides, so a typo would pass there)."""
    from muonkern.ops.ns5_args import JORDAN_COEFFICIENTS, POLAR_EXPRESS_COEFFICIENTS
    assert tuple(JORDAN_COEFFICIENTS) == tuple(JORDAN)
    assert [c for triple in POLAR_EXPRESS_COEFFICIENTS for c in triple] == list(POLAR_EXPRESS)


def test_schema_matches_python_definition():
    parsed = torch._C.parse_schema("muonkern::" + NS5_SCHEMA)
    assert str(parsed) == str(torch.ops.muonkern.ns5.default._schema)


def test_python_kernels_default_as_the_schema():
    """The dispatcher leaves out arguments equal to their schema default, so a Python kernel with
    another default would run something else (the fallback's and the fake kernel's ns5)."""
    from muonkern.ops.fallback import ns5_reference
    from muonkern.ops.grouped import NS5_GROUPED_SCHEMA, ns5_grouped_fake, ns5_grouped_kernel
    from muonkern.ops.registration import _ns5_fake
    for schema, kernels in [(NS5_SCHEMA, (ns5_reference, _ns5_fake, muonkern.ns5)),
                            (NS5_GROUPED_SCHEMA, (ns5_grouped_kernel, ns5_grouped_fake, muonkern.ns5_grouped))]:
        want = {a.name: a.default_value for a in torch._C.parse_schema("muonkern::" + schema).arguments[1:]}
        for kernel in kernels:
            params = inspect.signature(kernel).parameters
            got = {name: params[name].default for name in want}
            assert got == want, (kernel.__name__, got, want)


@pytest.mark.parametrize("shape", BATCH_DIM_SHAPES + ORIENTATION_SHAPES, ids=shape_id)
def test_matches_float64(gen, shape):
    G = randn(gen, *shape)
    assert_ns5_output(ns5(G), G)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(gen, dtype):
    G = randn(gen, 3, 24, 80, dtype=dtype)
    assert_ns5_output(ns5(G), G)


# Power-of-two scales leave bf16 rounding unchanged; the norm must neither overflow nor underflow.
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 2.0 ** -20), (torch.float32, 2.0 ** -8),
                                         (torch.float32, 2.0 ** 12), (torch.float16, 2.0 ** 10),
                                         (torch.bfloat16, 2.0 ** 40)], ids=str)
def test_input_scale(gen, dtype, scale):
    G = (randn(gen, 2, 24, 80) * scale).to(dtype)
    assert_ns5_output(ns5(G), G)


@pytest.mark.parametrize("eps", [1e-7, 1e-3])
def test_eps_is_added_to_the_norm(gen, eps):
    """A matrix whose norm equals eps is scaled by 1/(2 eps), not 1/||G||."""
    G = randn(gen, 2, 16, 48)
    G = G / torch.linalg.vector_norm(G, dim=(-2, -1), keepdim=True) * eps
    assert_ns5_output(ns5(G, 5, None, eps), G, eps=eps)


@pytest.mark.parametrize("name", list(noncontiguous_views(torch.Generator(), "meta")), ids=str)
def test_noncontiguous(gen, name):
    check_noncontiguous(noncontiguous_views(gen, "cpu")[name])


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=shape_id)
def test_empty(shape):
    G = torch.empty(shape)
    out = ns5(G)
    assert out.shape == G.shape and out.dtype == G.dtype and out.is_contiguous()


@pytest.mark.parametrize("shape", [(3, 24, 80), (2, 80, 24)], ids=shape_id)
def test_steps_zero_normalizes(gen, shape):
    G = randn(gen, *shape)
    assert_ns5_output(ns5(G, 0), G, steps=0, rtol=NORMALIZE_RTOL)
    assert_ns5_output(ns5(G, 0, []), G, steps=0, rtol=NORMALIZE_RTOL)


@pytest.mark.parametrize("shape", [(2, 32, 128), (2, 128, 32), (2, 64, 64)], ids=shape_id)
def test_polar_express_schedule(gen, shape):
    """Per-step coefficients: each step uses its own triple, in order."""
    G = randn(gen, *shape)
    out = ns5(G, 5, POLAR_EXPRESS)
    assert_ns5_output(out, G, 5, POLAR_EXPRESS, rtol=POLAR_RTOL)
    assert_singular_values_in_band(out, G, 5, POLAR_EXPRESS)


def test_two_step_custom_schedule(gen):
    G = randn(gen, 3, 24, 80)
    coefficients = [2.0, -1.5, 0.5, *JORDAN]
    assert_ns5_output(ns5(G, 2, coefficients), G, 2, coefficients)


def test_explicit_jordan_list_equals_default(gen):
    G = randn(gen, 2, 24, 80)
    assert torch.equal(ns5(G, 5, list(JORDAN) * 5), ns5(G))
    assert torch.equal(torch.ops.muonkern.ns5(G), ns5(G, 5, None, 1e-7))  # schema defaults


def test_python_wrapper(gen):
    G = randn(gen, 2, 24, 80)
    assert torch.equal(muonkern.ns5(G), ns5(G))
    assert torch.equal(muonkern.ns5(G, 5, tuple(POLAR_EXPRESS), 1e-7), ns5(G, 5, POLAR_EXPRESS))


@pytest.mark.parametrize("shape", [(4, 32, 128), (2, 96, 24)], ids=shape_id)
def test_convergent_cubic_orthogonalizes(gen, shape):
    """20 steps of cubic Newton-Schulz (1.5, -0.5, 0) converge: all singular values ~1."""
    G = randn(gen, *shape)
    s = torch.linalg.svdvals(ns5(G, 20, [1.5, -0.5, 0.0] * 20).double())
    assert (s - 1).abs().max().item() <= ORTHO_TOL


@pytest.mark.parametrize("shape", [(4, 32, 128), (4, 128, 32), (2, 48, 160)], ids=shape_id)
def test_singular_values_in_band(gen, shape):
    G = randn(gen, *shape)
    assert_singular_values_in_band(ns5(G), G)


def test_zero_matrices(gen):
    check_zero_matrices(gen, "cpu")


def test_nonfinite_matrix_is_isolated(gen):
    check_nonfinite_isolated(gen, "cpu")


def test_input_untouched_output_fresh(gen):
    G = randn(gen, 2, 24, 80)
    before = G.clone()
    out = ns5(G)
    assert torch.equal(G, before)
    assert out.untyped_storage().data_ptr() != G.untyped_storage().data_ptr()


@pytest.mark.parametrize("case", ERROR_CASES, ids=ERROR_IDS)
def test_errors(case):
    check_error(case, "cpu")


@pytest.mark.parametrize("case", ERROR_CASES, ids=ERROR_IDS)
def test_error_messages_equal_the_fallback(case):
    """Whichever backend serves the call, the message is the fallback's, word for word."""
    from muonkern.ops.fallback import ns5_reference
    if muonkern.backend() == "fallback":
        pytest.skip("the op is the fallback itself")
    _, make, kwargs, exc, _ = case
    G = make("cpu")
    args = (kwargs.get("steps", 5), kwargs.get("coefficients"), kwargs.get("eps", 1e-7),
            kwargs.get("algorithm", "auto"))
    with pytest.raises(exc) as got:
        torch.ops.muonkern.ns5(G, *args)
    with pytest.raises(exc) as want:
        ns5_reference(G, *args)
    assert str(got.value).splitlines()[0] == str(want.value).splitlines()[0]


def test_torch_compile_fullgraph_matches_eager(gen):
    def f(x):
        return torch.ops.muonkern.ns5(x * 2, 5, None, 1e-7) + torch.ops.muonkern.ns5(x, 5, POLAR_EXPRESS, 1e-7)

    G = randn(gen, 3, 16, 40)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(G), f(G))


@pytest.mark.parametrize("args", [
    ((3, 16, 40), 5, None, 1e-7),
    ((2, 40, 16), 3, [1.5, -0.5, 0.0, 2.0, -1.5, 0.5, *JORDAN], 1e-6),
], ids=["default", "coefficients"])
def test_opcheck(gen, args):
    shape, steps, coefficients, eps = args
    torch.library.opcheck(torch.ops.muonkern.ns5.default, (randn(gen, *shape), steps, coefficients, eps))


_FALLBACK_SCRIPT = """
import sys, torch, muonkern
inputs = torch.load(sys.argv[1])
outs = {"backend": muonkern.backend(),
        "default": torch.ops.muonkern.ns5(inputs["G"], 5, None, 1e-7),
        "polar": torch.ops.muonkern.ns5(inputs["G"], 5, inputs["polar"], 1e-7),
        "tall": torch.ops.muonkern.ns5(inputs["tall"], 5, None, 1e-7),
        "gram": torch.ops.muonkern.ns5(inputs["G"], 5, None, 1e-7, "gram"),
        "gram_tall": torch.ops.muonkern.ns5(inputs["tall"], 5, inputs["polar"], 1e-7, "gram")}
G = inputs["G"].clone().requires_grad_()
try:
    torch.ops.muonkern.ns5(G).sum().backward()
    outs["backward"] = "ran"
except RuntimeError as e:
    outs["backward"] = str(e)
import torch.autograd.forward_ad as fwAD
for key, grad_mode in (("forward_ad", True), ("forward_ad_no_grad", False)):
    with fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
        try:
            torch.ops.muonkern.ns5(fwAD.make_dual(inputs["G"], torch.ones_like(inputs["G"])))
            outs[key] = "ran"
        except NotImplementedError:
            outs[key] = "NotImplementedError"
torch.save(outs, sys.argv[2])
"""


@pytest.fixture(scope="module")
def forced_fallback_run(tmp_path_factory):
    """One subprocess with MUONKERN_FORCE_FALLBACK=1; returns its inputs and outputs."""
    tmp = tmp_path_factory.mktemp("fallback")
    gen = torch.Generator().manual_seed(20260)
    inputs = {"G": randn(gen, 3, 24, 80), "polar": POLAR_EXPRESS, "tall": randn(gen, 2, 80, 24)}
    torch.save(inputs, tmp / "in.pt")
    package_root = str(Path(muonkern.__file__).resolve().parents[1])
    env = dict(os.environ, MUONKERN_FORCE_FALLBACK="1",
               PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT, str(tmp / "in.pt"), str(tmp / "out.pt")],
                   env=env, check=True, timeout=300)
    return inputs, torch.load(tmp / "out.pt")


def test_force_fallback_env(forced_fallback_run):
    assert forced_fallback_run[1]["backend"] == "fallback"


def test_backward_raises(gen, forced_fallback_run):
    """No muonkern op has a derivative: outputs of inputs that require grad carry a backward that
    raises (compiled extension and fallback alike), instead of a gradient through the kernels'
    internals; without grad the outputs are plain tensors."""
    G = randn(gen, 2, 16, 40).requires_grad_()
    out = ns5(G)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="derivative for muonkern::ns5 is not implemented"):
        out.sum().backward()
    assert G.grad is None
    with torch.no_grad():
        assert not ns5(G).requires_grad
    assert not ns5(G.detach()).requires_grad
    grouped = muonkern.ns5_grouped([G, randn(gen, 8, 8)])
    with pytest.raises(RuntimeError, match="derivative for muonkern::ns5_grouped is not implemented"):
        sum(o.sum() for o in grouped).backward()
    for grad_mode in (True, False):   # forward mode: no jvp either, under no_grad too
        with fwAD.dual_level(), torch.set_grad_enabled(grad_mode), pytest.raises(NotImplementedError):
            ns5(fwAD.make_dual(G.detach(), torch.ones_like(G)))
    assert "derivative for muonkern::ns5 is not implemented" in forced_fallback_run[1]["backward"]
    assert forced_fallback_run[1]["forward_ad"] == forced_fallback_run[1]["forward_ad_no_grad"] == "NotImplementedError"


def test_fallback_agrees_with_extension(forced_fallback_run):
    if muonkern.backend() == "fallback":
        pytest.skip("the in-process backend is the fallback too: the comparison would be trivial")
    inputs, fallback = forced_fallback_run
    ours = {"default": ns5(inputs["G"]), "polar": ns5(inputs["G"], 5, POLAR_EXPRESS), "tall": ns5(inputs["tall"]),
            "gram": ns5(inputs["G"], algorithm="gram"), "gram_tall": ns5(inputs["tall"], 5, POLAR_EXPRESS, algorithm="gram")}
    diffs = {name: relative_difference(out, fallback[name]) for name, out in ours.items()}
    assert max(diffs.values()) <= EXT_VS_FALLBACK_RTOL, json.dumps(diffs)


def test_cpu_bf16_products_accumulate_in_fp32_and_round_once(gen):
    """On CPU the fallback's bf16 GEMMs (and the CPU kernel's, which test_fallback_agrees_with_extension
    ties to them) run as fp32 GEMMs of the bf16 values, or as ATen's bf16 GEMM on a CPU with
    AVX512-BF16; either must meet the GPU's arithmetic: within the bound of reference.bf16_product_excess.
    `python bench/cpu_measurements.py product-bound`: correct arithmetic reaches 0.94-0.98 of it over
    10 seeds (one rounding nearly reaches u); an accumulation in bf16 misses it 53-88-fold, a second
    rounding (through fp16) 1.02-1.09-fold, the product rounded before beta C is added 2.3-2.9-fold."""
    from muonkern.ops.fallback import products_for
    from reference import bf16_product_excess
    a, b, C = (randn(gen, 3, 48, 200).bfloat16(), randn(gen, 3, 200, 40).bfloat16(), randn(gen, 3, 48, 40).bfloat16())
    matmul, baddbmm = products_for(a)
    for (beta, alpha), out in [((0.0, 1.0), matmul(a, b)), ((0.5, -1.5), baddbmm(C, a, b, 0.5, -1.5))]:
        assert out.dtype == torch.bfloat16
        assert bf16_product_excess(out, C, a, b, beta, alpha) <= 1


def test_cpu_kernel_and_fallback_pick_their_bf16_gemms_alike():
    """Both use ATen's bf16 GEMM where the CPU has AVX512-BF16 and fp32 GEMMs of the bf16 values
    elsewhere (README, *CPU*); on large matrices the two round differently, so a split rule would
    break their bitwise agreement only there, where test_fallback_agrees_with_extension does not look."""
    if muonkern.backend() == "fallback":
        pytest.skip("no compiled extension: its rule cannot be asked")
    from muonkern.ops.fallback import cpu_has_avx512_bf16
    assert muonkern._C.cpu_has_avx512_bf16() is cpu_has_avx512_bf16()
