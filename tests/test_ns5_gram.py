"""muonkern::ns5 with algorithm="gram" (Gram Newton-Schulz) and "auto", on CPU tensors.

The Gram iteration computes the standard iteration's polynomial through R = X Xᵀ (n×n XᵀX for a tall
X). Checked here: in float64 it is the standard iteration up to rounding (restarts included); in
bf16 its distance to the exact polar factor stays within GRAM_POLAR_MARGIN of the standard
iteration's; the C++ kernel equals the fallback; "auto" follows choose_algorithm, in Python and C++
(ns5_route says so for CPU tensors; tests/test_ns5_cuda.py checks the CUDA kernel's own route).
Budgets and their justification are in reference.py.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import muonkern
from muonkern.ops.fallback import gram_iteration, ns5_reference
from muonkern.ops.ns5_args import (GRAM_MIN_SHORT_SIDE, choose_algorithm, gram_restart_steps, ns5_flops,
                                   step_coefficients)
from muonkern.ops.ns5_routing import ns5_route
from ns5_cases import (EMPTY_SHAPES, check_noncontiguous, check_nonfinite_isolated, check_zero_matrices,
                       ill_conditioned, noncontiguous_views, ns5, assert_polar_margin, relative_difference, shape_id)
from reference import (BF16_RTOL, EXT_VS_FALLBACK_RTOL, GRAM_FLOAT64_RTOL, JORDAN,
                       NORMALIZE_RTOL, ORTHO_TOL, POLAR_EXPRESS, POLAR_RTOL, assert_ns5_output, ns5_float64,
                       randn, rel_err)

# wide, tall (right products), batched with two leading dims, square, a vector
SHAPES = [(48, 160), (160, 48), (2, 3, 32, 96), (3, 40, 40), (2, 1, 30)]


def gram_float64(G: torch.Tensor, steps: int, coefficients, restarts) -> torch.Tensor:
    X0 = G.double() / (torch.linalg.vector_norm(G.double(), dim=(-2, -1), keepdim=True) + 1e-7)
    return gram_iteration(X0, step_coefficients(steps, coefficients), restarts)


@pytest.mark.parametrize("restarts", ["default", "none", "every_step", "after_3"])
@pytest.mark.parametrize("schedule", ["jordan", "polar_express"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_float64_equals_the_standard_iteration(gen, shape, schedule, restarts):
    coefficients = POLAR_EXPRESS if schedule == "polar_express" else None
    restart_steps = {"default": gram_restart_steps(5), "none": [], "every_step": [1, 2, 3, 4],
                     "after_3": [3]}[restarts]
    G = randn(gen, *shape, dtype=torch.float64)
    err = rel_err(gram_float64(G, 5, coefficients, restart_steps), ns5_float64(G, 5, coefficients)).max().item()
    assert err <= GRAM_FLOAT64_RTOL, err


def test_float64_ill_conditioned_and_long_schedules(gen):
    G = ill_conditioned(gen, 3, 64, 192)
    for steps, coefficients in [(5, None), (8, None), (20, [1.5, -0.5, 0.0] * 20), (1, None), (0, None)]:
        for H in (G, G.mT):
            got = gram_float64(H, steps, coefficients, gram_restart_steps(steps))
            err = rel_err(got, ns5_float64(H, steps, coefficients)).max().item()
            assert err <= GRAM_FLOAT64_RTOL, (steps, tuple(H.shape), err)


def test_restart_steps():
    """Every 2nd step, never leaving a single step after the last restart."""
    assert [gram_restart_steps(s) for s in range(9)] == [[], [], [], [], [2], [2], [2, 4], [2, 4], [2, 4, 6]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["gaussian", "ill-conditioned"])
@pytest.mark.parametrize("schedule", ["jordan", "polar_express"])
@pytest.mark.parametrize("shape", [(4, 128, 512), (4, 512, 128), (8, 64, 256)], ids=shape_id)
def test_bf16_distance_to_polar_factor(gen, shape, schedule, kind, dtype):
    """The quantity Muon cares about: the Gram result is no farther from the polar factor than the
    standard iteration's, up to GRAM_POLAR_MARGIN (bf16 rounding; reference.py)."""
    coefficients = POLAR_EXPRESS if schedule == "polar_express" else None
    G = (randn(gen, *shape, dtype=torch.float64) if kind == "gaussian" else ill_conditioned(gen, *shape)).to(dtype)
    gram, standard = ns5(G, 5, coefficients, algorithm="gram"), ns5(G, 5, coefficients, algorithm="standard")
    assert_polar_margin(gram, standard, G, "standard")
    if kind == "gaussian":  # the bf16 budgets of the standard iteration hold for the Gram one too
        assert_ns5_output(gram, G, 5, coefficients, rtol=POLAR_RTOL if coefficients else BF16_RTOL)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_float64(gen, shape):
    G = randn(gen, *shape)
    assert_ns5_output(ns5(G, algorithm="gram"), G)


@pytest.mark.parametrize("shape", [(3, 24, 80), (2, 80, 24)], ids=shape_id)
def test_steps_zero_normalizes(gen, shape):
    G = randn(gen, *shape)
    assert_ns5_output(ns5(G, 0, algorithm="gram"), G, steps=0, rtol=NORMALIZE_RTOL)


@pytest.mark.parametrize("shape", [(4, 32, 128), (2, 96, 24)], ids=shape_id)
def test_convergent_cubic_orthogonalizes(gen, shape):
    """20 steps of cubic Newton-Schulz (c = 0 every step) with 9 restarts converge too."""
    G = randn(gen, *shape)
    s = torch.linalg.svdvals(ns5(G, 20, [1.5, -0.5, 0.0] * 20, algorithm="gram").double())
    assert (s - 1).abs().max().item() <= ORTHO_TOL


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=shape_id)
def test_empty(shape):
    G = torch.empty(shape)
    out = ns5(G, algorithm="gram")
    assert out.shape == G.shape and out.dtype == G.dtype and out.is_contiguous()


@pytest.mark.parametrize("name", list(noncontiguous_views(torch.Generator(), "meta")), ids=str)
def test_noncontiguous(gen, name):
    check_noncontiguous(noncontiguous_views(gen, "cpu")[name], algorithm="gram")


def test_zero_and_nonfinite_matrices(gen):
    check_zero_matrices(gen, "cpu", algorithm="gram")
    check_nonfinite_isolated(gen, "cpu", algorithm="gram")


@pytest.mark.parametrize("coefficients", [None, POLAR_EXPRESS, [1.5, -0.5, 0.0] * 5], ids=["jordan", "pe", "cubic"])
@pytest.mark.parametrize("shape", [(3, 48, 160), (2, 160, 48), (2, 2, 24, 40), (1, 1)], ids=shape_id)
def test_cpu_kernel_equals_fallback(gen, shape, coefficients):
    if muonkern.backend() == "fallback":
        pytest.skip("the op is the fallback itself: the comparison would be trivial")
    G = randn(gen, *shape)
    diff = relative_difference(ns5(G, 5, coefficients, algorithm="gram"),
                               ns5_reference(G, 5, coefficients, 1e-7, "gram"))
    assert diff <= EXT_VS_FALLBACK_RTOL, diff


# ---- "auto" -------------------------------------------------------------------------------------

GRID_SIDES = [1, 64, 511, 512, 700, 1024, 1535, 1536, 1537, 2048, 3000, 4096, 8192]


def test_choose_algorithm_rule():
    assert choose_algorithm(1024, 4096, 5) == choose_algorithm(4096, 1024, 5) == "gram"   # saves 1/3
    assert choose_algorithm(512, 1536, 5) == "gram"                                       # 1:3 saves 26%
    assert choose_algorithm(512, 1024, 5) == "standard"                                   # 1:2 saves 12%
    assert choose_algorithm(4096, 4096, 5) == "standard"                                  # square
    assert choose_algorithm(GRAM_MIN_SHORT_SIDE - 1, 8192, 5) == "standard"               # too small
    assert choose_algorithm(1024, 4096, 0) == "standard"
    assert choose_algorithm(768, 3072, 5) == "gram"
    assert ns5_flops(1024, 4096, 5, "gram") / ns5_flops(1024, 4096, 5, "standard") == pytest.approx(2 / 3)


def test_cpp_rule_equals_python_rule():
    if muonkern.backend() == "fallback":
        pytest.skip("no compiled extension")
    from muonkern import _C
    for m, n, steps in itertools.product(GRID_SIDES, GRID_SIDES, [0, 1, 2, 3, 4, 5, 6, 8, 20]):
        assert _C.ns5_auto_algorithm(m, n, steps) == choose_algorithm(m, n, steps), (m, n, steps)


# (shape, what auto runs on the CPU): the rule's outcomes written out, not recomputed by it
@pytest.mark.parametrize("shape,algorithm", [((512, 1536), "gram"), ((2, 24, 80), "standard"),
                                             ((3, 40, 40), "standard")], ids=lambda v: v if isinstance(v, str) else shape_id(v))
def test_route_on_cpu_follows_the_rule(shape, algorithm):
    route = ns5_route(torch.empty(shape))
    assert route.path == ("fallback" if muonkern.backend() == "fallback" else "cpu")
    assert route.algorithm == algorithm
    assert ns5_route(torch.empty(shape), steps=0).algorithm == "standard"


@pytest.mark.parametrize("bad,match", [(dict(G=torch.empty(4)), "rank >= 2"), (dict(algorithm="fast"), "algorithm"),
                                       (dict(steps=-1), "steps")])
def test_route_rejects_bad_arguments(bad, match):
    args = dict(G=torch.empty(2, 8), steps=5, algorithm="auto") | bad
    with pytest.raises(ValueError, match=match):
        ns5_route(args["G"], args["steps"], args["algorithm"])


@pytest.mark.parametrize("shape", [(512, 1536), (1536, 512), (2, 512, 1024), (2, 24, 80)], ids=shape_id)
def test_auto_runs_the_chosen_algorithm(gen, shape):
    G = randn(gen, *shape)
    chosen = ns5_route(G).algorithm  # choose_algorithm's rule (test_cpp_rule_equals_python_rule)
    other = {"gram": "standard", "standard": "gram"}[chosen]
    auto = ns5(G, algorithm="auto")
    assert torch.equal(auto, ns5(G, algorithm=chosen))
    assert not torch.equal(auto, ns5(G, algorithm=other))
    assert torch.equal(auto, torch.ops.muonkern.ns5(G))           # the schema default is "auto"
    assert torch.equal(auto, muonkern.ns5(G))                     # so is the wrapper's
    assert torch.equal(ns5(G, algorithm=other), muonkern.ns5(G, algorithm=other))


@pytest.mark.parametrize("algorithm", ["gram", "auto"])
def test_grouped_equals_ns5_of_each(gen, algorithm):
    """ns5_grouped passes the algorithm on; under gram a tall matrix keeps its orientation, so
    grouped and single calls agree bit for bit on CPU."""
    shapes = [(512, 1536), (1536, 512), (2, 512, 1536), (24, 80), (80, 24), (40, 40)]
    Gs = [randn(gen, *s) for s in shapes]
    out = muonkern.ns5_grouped(Gs, algorithm=algorithm)
    for G, o in zip(Gs, out):
        assert torch.equal(o, muonkern.ns5(G, algorithm=algorithm))


def test_grouped_rejects_bad_algorithm():
    with pytest.raises(ValueError, match=r"Gs\[0\]: algorithm must be"):
        muonkern.ns5_grouped([torch.randn(4, 8)], algorithm="fast")


@pytest.mark.parametrize("args", [
    ((3, 16, 40), 5, None, 1e-7, "gram"),
    ((2, 40, 16), 3, [1.5, -0.5, 0.0, 2.0, -1.5, 0.5, *JORDAN], 1e-6, "gram"),
    ((2, 16, 40), 5, None, 1e-7, "auto"),
    ((16, 40), 5, None, 1e-7, "standard"),
], ids=["gram", "gram_tall_coefficients", "auto", "standard"])
def test_opcheck(gen, args):
    shape, *rest = args
    torch.library.opcheck(torch.ops.muonkern.ns5.default, (randn(gen, *shape), *rest))


def test_opcheck_grouped(gen):
    Gs = [randn(gen, 8, 16), randn(gen, 16, 8), randn(gen, 2, 8, 16)]
    torch.library.opcheck(torch.ops.muonkern.ns5_grouped.default, (Gs, 5, None, 1e-7, "gram"))


def test_torch_compile_fullgraph(gen):
    def f(x):
        return torch.ops.muonkern.ns5(x, 5, None, 1e-7, "gram") + torch.ops.muonkern.ns5(x.mT, 5, None, 1e-7, "auto").mT

    G = randn(gen, 3, 16, 40)
    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(G), f(G))
