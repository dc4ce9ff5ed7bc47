"""muonkern::ns5 on CUDA tensors: both paths of the CUDA kernels, forced with MUONKERN_NS5_PATH, for
the standard iteration and the Gram one (algorithm="gram": the general path's kernels and cuBLASLt,
csrc/ns5_cuda.cpp, or the fused kernel where it fits and the cost model takes it), and the route
"auto" takes (muonkern.ops.ns5_route).

The op reads MUONKERN_NS5_PATH at each call: `fused` (one launch per batch, small matrices; where a
shape does not fit it, the op quietly takes the general path), `general` (cuBLASLt), `auto`.
Skipped as a whole without a GPU. When the backend is not "cuda" (extension built without CUDA, or
the fallback), CUDA tensors run the pure-PyTorch fallback and the path variable has no effect.
"""
from __future__ import annotations


import pytest
import torch

import muonkern
from muonkern.ops.ns5_args import choose_algorithm
from muonkern.ops.ns5_routing import ns5_route
from ns5_cases import (DTYPES, EMPTY_SHAPES, ERROR_CASES, ERROR_IDS, check_error, check_noncontiguous,
                       check_nonfinite_isolated, check_zero_matrices, ill_conditioned, noncontiguous_views, ns5,
                       assert_polar_margin, relative_difference, shape_id)
from reference import (BF16_RTOL, CROSS_DEVICE_RTOL, JORDAN, NORMALIZE_RTOL, ORTHO_TOL,
                       POLAR_EXPRESS, POLAR_RTOL, assert_ns5_output, assert_singular_values_in_band, randn,
                       rel_err)

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

PATHS = ["fused", "general"]

# Tests of which kernel and algorithm a call takes: with another backend CUDA tensors run the fallback.
cuda_kernels = pytest.mark.skipif(muonkern.backend() != "cuda",
                                  reason=f"backend is {muonkern.backend()!r}: CUDA tensors run the fallback")

# The benchmark's baseline shapes at moderate sizes, then orientations, edge sizes and batch layouts.
SHAPES = [
    (48, 128, 128),     # fused
    (12, 64, 768),      # fused
    (1, 128, 600),      # fused, one matrix
    (768, 768),         # general (too big for the fused kernel)
    (768, 3072),        # general
    (3, 768, 64),       # m > n
    (2, 3, 40, 24),     # 4-D batch, m > n
    (4, 17, 33),        # odd sizes
    (300, 32, 64),      # more matrices than SMs
    (2, 130, 300),      # short side 130 > 128: general even when fused is asked for
    (2, 1, 50), (2, 50, 1), (1, 1),
]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("MUONKERN_NS5_PATH", request.param)
    return request.param


def poison_allocator(nbytes: int = 256 << 20) -> None:
    """Leaves NaN in the caching allocator's free blocks: an output element the kernel never
    writes then reads NaN rather than a plausible stale value."""
    junk = torch.full((nbytes // 4,), float("nan"), device="cuda")
    del junk


@pytest.mark.parametrize("path_name", ["auto", *PATHS])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_float64(gen, monkeypatch, path_name, shape):
    monkeypatch.setenv("MUONKERN_NS5_PATH", path_name)
    G = randn(gen, *shape, device="cuda")
    poison_allocator()
    assert_ns5_output(ns5(G), G)  # every element finite and within budget: nothing left unwritten


@pytest.mark.parametrize("algorithm", ["standard", "gram", "auto"])
def test_large_general(gen, algorithm):
    """A large batch (4 of the benchmark's 1024x4096: auto takes gram there) with each algorithm."""
    G = randn(gen, 4, 1024, 4096, device="cuda")
    assert_ns5_output(ns5(G, algorithm=algorithm), G)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(gen, path, dtype):
    G = randn(gen, 6, 64, 192, dtype=dtype, device="cuda")
    assert_ns5_output(ns5(G), G)


@pytest.mark.parametrize("name", list(noncontiguous_views(torch.Generator(), "meta")), ids=str)
def test_noncontiguous(gen, path, name):
    check_noncontiguous(noncontiguous_views(gen, "cuda")[name])


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=shape_id)
def test_empty(path, shape):
    G = torch.empty(shape, device="cuda")
    out = ns5(G)
    assert out.shape == G.shape and out.dtype == G.dtype and out.is_contiguous() and out.is_cuda


def test_steps_zero_normalizes(gen, path):
    for shape in [(8, 64, 192), (3, 192, 64)]:
        G = randn(gen, *shape, device="cuda")
        assert_ns5_output(ns5(G, 0), G, steps=0, rtol=NORMALIZE_RTOL)


@pytest.mark.parametrize("shape", [(8, 32, 128), (4, 128, 32), (4, 64, 64), (768, 768)], ids=shape_id)
def test_polar_express_schedule(gen, path, shape):
    G = randn(gen, *shape, device="cuda")
    out = ns5(G, 5, POLAR_EXPRESS)
    assert_ns5_output(out, G, 5, POLAR_EXPRESS, rtol=POLAR_RTOL)
    if G.dim() == 3:
        assert_singular_values_in_band(out, G, 5, POLAR_EXPRESS)


@pytest.mark.parametrize("steps", [20, 40])  # the fused kernel takes at most 32 steps
def test_convergent_cubic_orthogonalizes(gen, path, steps):
    G = randn(gen, 4, 32, 128, device="cuda")
    s = torch.linalg.svdvals(ns5(G, steps, [1.5, -0.5, 0.0] * steps).double())
    assert (s - 1).abs().max().item() <= ORTHO_TOL


def test_explicit_jordan_list_equals_default(gen, path):
    G = randn(gen, 4, 64, 192, device="cuda")
    assert torch.equal(ns5(G, 5, list(JORDAN) * 5), ns5(G))


@pytest.mark.parametrize("shape", [(8, 32, 128), (8, 128, 32), (4, 48, 160)], ids=shape_id)
def test_singular_values_in_band(gen, path, shape):
    G = randn(gen, *shape, device="cuda")
    assert_singular_values_in_band(ns5(G), G)


def test_zero_matrices(gen, path):
    check_zero_matrices(gen, "cuda")
    check_zero_matrices(gen, "cuda", shape=(3, 128, 256))


def test_nonfinite_matrix_is_isolated(gen, path):
    check_nonfinite_isolated(gen, "cuda")
    check_nonfinite_isolated(gen, "cuda", shape=(5, 96, 512))


@pytest.mark.parametrize("case", ERROR_CASES, ids=ERROR_IDS)
def test_errors(case):
    check_error(case, "cuda")


def test_deterministic(gen, path):
    G = randn(gen, 12, 64, 768, device="cuda")
    assert torch.equal(ns5(G), ns5(G))


@pytest.mark.parametrize("shape", [(48, 128, 128), (12, 64, 768), (3, 768, 64), (768, 768), (2, 3, 40, 24)],
                         ids=shape_id)
def test_agrees_with_cpu(gen, path, shape):
    G = randn(gen, *shape)
    diff = relative_difference(ns5(G.cuda()), ns5(G))
    assert diff <= CROSS_DEVICE_RTOL, f"CUDA vs CPU relative difference {diff:.4g}"


def check_side_stream(G: torch.Tensor, algorithm: str = "standard") -> None:
    """The op runs on the current stream: work queued before it on a side stream is seen."""
    expected = ns5(G, algorithm=algorithm)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        H = torch.zeros_like(G)
        torch.cuda._sleep(1_000_000)  # delay the copy: a kernel on another stream would read zeros
        H.copy_(G)
        out = ns5(H, algorithm=algorithm)
    side.synchronize()
    assert torch.equal(out, expected)


def test_side_stream(gen, path):
    check_side_stream(randn(gen, 48, 128, 128, device="cuda"))


@pytest.mark.parametrize("args", [((4, 32, 96), 5, None, 1e-7), ((2, 96, 32), 3, [1.5, -0.5, 0.0] * 3, 1e-6)],
                         ids=["default", "coefficients"])
def test_opcheck(gen, path, args):
    shape, steps, coefficients, eps = args
    G = randn(gen, *shape, device="cuda")
    torch.library.opcheck(torch.ops.muonkern.ns5.default, (G, steps, coefficients, eps))


def test_torch_compile_fullgraph_inductor(gen, path):
    def f(x):
        return torch.ops.muonkern.ns5(x * 2, 5, None, 1e-7) + torch.ops.muonkern.ns5(x, 5, POLAR_EXPRESS, 1e-7)

    G = randn(gen, 12, 64, 768, device="cuda")
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(G), f(G), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(48, 128, 128), (768, 768)], ids=shape_id)
def test_cuda_graph_replay(gen, path, shape):
    static_in = randn(gen, *shape, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture (plans, workspaces)
        for _ in range(2):
            ns5(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ns5(static_in)
    for _ in range(2):
        fresh = randn(gen, *shape, device="cuda")
        static_in.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, ns5(fresh))


@cuda_kernels
def test_backend_serves_cuda():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("muonkern::ns5", "CUDA")


# ---- algorithm="gram" and "auto" ---------------------------------------------------------------

GRAM_SHAPES = [
    (1024, 4096),       # 1:4, where gram saves the most FLOPs
    (4096, 1024),       # tall: n x n Gram matrix, right products
    (4, 512, 2048),     # batched
    (2, 768, 3072),     # GPT-2's MLP shape
    (3, 768, 64),       # m > n, small
    (2, 3, 40, 24),     # 4-D batch
    (4, 17, 33), (2, 1, 50), (1, 1),
]


# The Gram tests below run on both paths (the `path` fixture): small shapes take the fused kernel
# by default, and MUONKERN_NS5_PATH=general keeps the cuBLASLt Gram iteration covered on them. Here the
# fused case runs the shapes whose short side fits the fused kernel (kFusedMaxShortSide, 128) only.
GRAM_PATH_CASES = [(p, s) for s in GRAM_SHAPES for p in PATHS if p == "general" or min(s[-2:]) <= 128]


@pytest.mark.parametrize("path_name,shape", GRAM_PATH_CASES, ids=lambda v: v if isinstance(v, str) else shape_id(v))
def test_gram_matches_float64(gen, monkeypatch, path_name, shape):
    monkeypatch.setenv("MUONKERN_NS5_PATH", path_name)
    G = randn(gen, *shape, device="cuda")
    if muonkern.backend() == "cuda":
        assert ns5_route(G, algorithm="gram").path == path_name, ns5_route(G, algorithm="gram")
    poison_allocator()
    assert_ns5_output(ns5(G, algorithm="gram"), G)


# ---- the fused kernel's clusters, and the Gram iteration on it (MUONKERN_NS5_PATH=fused) ----------
# For the Gram iteration, R = X X^T is reduced over the cluster at the start and at each restart,
# the R x R steps run by every block of the cluster alike. Every shape here fits at every cluster size
# (the Gram iteration has two more Rp x Rp buffers than the standard one: at short side 128 one block
# holds at most 352 columns, a cluster of 2 at most 192; the standard one takes 1x128x600 at every
# size), so none falls back to the general path. (The float64, dtype and polar-factor checks of the
# Gram iteration run on both paths further down, through the `path` fixture.)
# assert_fused_route checks each case's route: a forced path that does not fit would run the general
# path silently.

def assert_fused_route(G: torch.Tensor, steps: int = 5, cluster: int | None = None, algorithm: str = "gram") -> None:
    route = ns5_route(G, steps, algorithm)
    assert route.path == "fused", f"{tuple(G.shape)} leaves the fused kernel: {route}"
    assert cluster is None or route.cluster == cluster, f"{tuple(G.shape)}: cluster {route.cluster}, not {cluster}"


CLUSTER_SHAPES = [(12, 64, 768), (2, 96, 130), (3, 700, 40), (1, 128, 192), (2, 1, 50)]


@cuda_kernels
@pytest.mark.parametrize("cluster", ["1", "2", "4", "8"])
@pytest.mark.parametrize("algorithm,shape",
                         [("standard", s) for s in [*CLUSTER_SHAPES, (1, 128, 600)]] +
                         [("gram", s) for s in CLUSTER_SHAPES],
                         ids=lambda v: shape_id(v) if isinstance(v, tuple) else v)
def test_fused_cluster_sizes(gen, monkeypatch, cluster, algorithm, shape):
    """The fused kernel spreads a matrix over a cluster of 1-8 blocks (MUONKERN_NS5_CLUSTER forces
    the size); every size computes the same iteration."""
    monkeypatch.setenv("MUONKERN_NS5_PATH", "fused")
    monkeypatch.setenv("MUONKERN_NS5_CLUSTER", cluster)
    G = randn(gen, *shape, device="cuda")
    assert_fused_route(G, cluster=int(cluster), algorithm=algorithm)
    poison_allocator()
    assert_ns5_output(ns5(G, algorithm=algorithm), G)


def assert_chain_matches_synchronized(G, algorithm):
    """Six calls, each on the last one's output with nothing launched between (poisoned until
    written), equal the same chain with the stream synchronized between calls, bit for bit."""
    poison_allocator()
    chained = [G]
    for _ in range(6):
        chained.append(ns5(chained[-1], algorithm=algorithm))
    synchronized = [G]
    for _ in range(6):
        synchronized.append(ns5(synchronized[-1], algorithm=algorithm))
        torch.cuda.synchronize()
    for step, (a, b) in enumerate(zip(chained[1:], synchronized[1:]), 1):
        assert torch.equal(a, b), f"call {step} of the chain differs from its synchronized twin"


@cuda_kernels
@pytest.mark.parametrize("cluster", ["1", "2", "8"])
@pytest.mark.parametrize("algorithm", ["standard", "gram"])
def test_fused_chained_calls_wait_for_their_input(gen, monkeypatch, cluster, algorithm):
    """A fused launch lets the next one in the stream start early (programmatic dependent launch),
    and each waits for the previous kernel's writes before it reads its input (the kernel is
    deterministic, so a chain must match its synchronized twin bit for bit)."""
    monkeypatch.setenv("MUONKERN_NS5_PATH", "fused")
    monkeypatch.setenv("MUONKERN_NS5_CLUSTER", cluster)
    G = randn(gen, 12, 64, 768, device="cuda")
    assert_fused_route(G, cluster=int(cluster), algorithm=algorithm)
    assert_chain_matches_synchronized(G, algorithm)


@cuda_kernels
@pytest.mark.parametrize("cluster", ["1", "4"])
@pytest.mark.parametrize("algorithm", ["standard", "gram"])
@pytest.mark.parametrize("scale", [2.0 ** -50, 2.0 ** -20, 2.0 ** 40], ids=["2^-50", "2^-20", "2^40"])
def test_fused_input_scales(gen, monkeypatch, cluster, algorithm, scale):
    """The fused kernel defers 1/(||G|| + eps) to its products for norms within [1e-10, 1e10] and
    scales X in shared memory outside (2^-50 and 2^40 here: norms near 1.2e-13 and 1.5e14); a cluster
    learns the norm from its first Gram reduction. Powers of two leave the bf16 rounding unchanged,
    so every case keeps the float64 budget, after 5 steps and after 0 (the normalized input)."""
    monkeypatch.setenv("MUONKERN_NS5_PATH", "fused")
    monkeypatch.setenv("MUONKERN_NS5_CLUSTER", cluster)
    G = randn(gen, 3, 64, 300, device="cuda") * scale
    norms = torch.linalg.vector_norm(G.double(), dim=(-2, -1))
    inside = bool(((norms >= 1e-10) & (norms <= 1e10)).all())
    assert inside == (scale == 2.0 ** -20), (scale, norms.tolist())
    for steps in (5, 0):
        assert_fused_route(G, steps, cluster=int(cluster), algorithm=algorithm)
    poison_allocator()
    assert_ns5_output(ns5(G, algorithm=algorithm), G)
    assert_ns5_output(ns5(G, 0, algorithm=algorithm), G, steps=0, rtol=NORMALIZE_RTOL)


# Restart schedules (gram_restart_steps): 1 or 3 steps none, 5 after step 2, 6 after steps 2 and 4;
# the Polar Express schedule's per-step coefficients.
@cuda_kernels
@pytest.mark.parametrize("steps,coefficients,rtol",
                         [(1, None, None), (3, None, None), (6, None, None), (5, POLAR_EXPRESS, POLAR_RTOL)],
                         ids=["1-step", "3-steps", "6-steps", "polar-express"])
def test_fused_gram_schedules(gen, monkeypatch, steps, coefficients, rtol):
    monkeypatch.setenv("MUONKERN_NS5_PATH", "fused")
    G = randn(gen, 8, 64, 512, device="cuda")
    assert_fused_route(G, steps)
    assert_ns5_output(ns5(G, steps, coefficients, algorithm="gram"), G, steps, coefficients, rtol=rtol)


@cuda_kernels
def test_fused_gram_many_restarts(gen, monkeypatch):
    """20 steps of the convergent cubic: restarts after steps 2, 4, ..., 18 (the restart mask's
    higher bits)."""
    monkeypatch.setenv("MUONKERN_NS5_PATH", "fused")
    G = randn(gen, 3, 64, 192, device="cuda")
    assert_fused_route(G, 20)
    s = torch.linalg.svdvals(ns5(G, 20, [1.5, -0.5, 0.0] * 20, algorithm="gram").double())
    assert (s - 1).abs().max().item() <= ORTHO_TOL


@cuda_kernels
def test_fused_gram_zero_and_nonfinite_matrices(gen, monkeypatch):
    monkeypatch.setenv("MUONKERN_NS5_PATH", "fused")
    for shape in [(3, 40, 256), (5, 96, 200)]:
        assert_fused_route(torch.empty(shape, device="cuda"))
    check_zero_matrices(gen, "cuda", shape=(3, 40, 256), algorithm="gram")
    check_nonfinite_isolated(gen, "cuda", shape=(5, 96, 200), algorithm="gram")


@cuda_kernels
@pytest.mark.parametrize("kind", ["gaussian", "ill-conditioned"])
@pytest.mark.parametrize("shape", [(4, 128, 512), (4, 512, 128)], ids=shape_id)
def test_fused_gram_distance_to_polar_factor(gen, monkeypatch, shape, kind):
    """As test_gram_distance_to_polar_factor, on the fused kernel (clusters of 8 here). With Q = P Q
    mirrored from one triangle it measured 0.0202 and 0.0206 on the ill-conditioned inputs;
    bench/gram_rounding_emulation.py emulates both."""
    monkeypatch.setenv("MUONKERN_NS5_PATH", "fused")
    G = (randn(gen, *shape, dtype=torch.float64) if kind == "gaussian" else ill_conditioned(gen, *shape)).float().cuda()
    assert_fused_route(G, cluster=8)
    gram, standard = ns5(G, algorithm="gram"), ns5(G, algorithm="standard")
    assert torch.isfinite(gram).all()
    assert_polar_margin(gram, standard, G, "standard")


@cuda_kernels
def test_fused_gram_near_the_general_gram(gen, monkeypatch):
    """The same iteration on both paths: within bf16 rounding of each other, and no farther from the
    polar factor than the standard iteration by more than the Gram margin."""
    G = randn(gen, 16, 96, 768, device="cuda")
    monkeypatch.setenv("MUONKERN_NS5_PATH", "fused")
    assert_fused_route(G)
    fused = ns5(G, algorithm="gram")
    monkeypatch.setenv("MUONKERN_NS5_PATH", "general")
    general = ns5(G, algorithm="gram")
    assert not torch.equal(fused, general), "the fused kernel did not run (bitwise the general path's result)"
    diff = relative_difference(fused, general)
    assert diff <= BF16_RTOL, f"fused vs general Gram: relative difference {diff:.4g}"
    assert_polar_margin(fused, ns5(G, algorithm="standard"), G, "standard")


@pytest.mark.parametrize("shape", [(8, 128, 512), (8, 512, 128), (2, 1024, 4096)], ids=shape_id)
def test_gram_polar_express(gen, shape):
    G = randn(gen, *shape, device="cuda")
    assert_ns5_output(ns5(G, 5, POLAR_EXPRESS, algorithm="gram"), G, 5, POLAR_EXPRESS, rtol=POLAR_RTOL)


@pytest.mark.parametrize("kind", ["gaussian", "ill-conditioned"])
@pytest.mark.parametrize("shape", [(4, 128, 512), (4, 512, 128), (1024, 4096)], ids=shape_id)
def test_gram_distance_to_polar_factor(gen, monkeypatch, shape, kind):
    """As on CPU (tests/test_ns5_gram.py): no farther from the polar factor than the standard
    iteration (here the CUDA kernels') by more than GRAM_POLAR_MARGIN, on the cuBLASLt path (the fused
    kernel's: test_fused_gram_distance_to_polar_factor)."""
    monkeypatch.setenv("MUONKERN_NS5_PATH", "general")
    G = (randn(gen, *shape, dtype=torch.float64) if kind == "gaussian" else ill_conditioned(gen, *shape)).float().cuda()
    gram, standard = ns5(G, algorithm="gram"), ns5(G, algorithm="standard")
    assert torch.isfinite(gram).all()
    assert_polar_margin(gram, standard, G, "standard")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gram_dtypes(gen, path, dtype):
    G = randn(gen, 6, 64, 192, dtype=dtype, device="cuda")
    assert_ns5_output(ns5(G, algorithm="gram"), G)
    assert_ns5_output(ns5(G, 0, algorithm="gram"), G, steps=0, rtol=NORMALIZE_RTOL)


def test_gram_steps_zero_and_cubic(gen, path):
    G = randn(gen, 3, 192, 64, device="cuda")
    assert_ns5_output(ns5(G, 0, algorithm="gram"), G, steps=0, rtol=NORMALIZE_RTOL)
    s = torch.linalg.svdvals(ns5(G, 20, [1.5, -0.5, 0.0] * 20, algorithm="gram").double())
    assert (s - 1).abs().max().item() <= ORTHO_TOL


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=shape_id)
def test_gram_empty(shape):
    G = torch.empty(shape, device="cuda")
    out = ns5(G, algorithm="gram")
    assert out.shape == G.shape and out.dtype == G.dtype and out.is_contiguous() and out.is_cuda


@pytest.mark.parametrize("name", list(noncontiguous_views(torch.Generator(), "meta")), ids=str)
def test_gram_noncontiguous(gen, path, name):
    check_noncontiguous(noncontiguous_views(gen, "cuda")[name], algorithm="gram")


def test_gram_zero_and_nonfinite_matrices(gen, path):
    check_zero_matrices(gen, "cuda", shape=(3, 128, 256), algorithm="gram")
    check_nonfinite_isolated(gen, "cuda", shape=(5, 96, 512), algorithm="gram")


# Norms of a 256 x 1024 Gaussian times these: ~5e-12 and ~5e11 fall outside the range [1e-10, 1e10]
# where the normalize kernel defers one wide matrix's scale to the Gram products
# (csrc/kernels/ns5_prep.cu; the default, MUONKERN_NS5_DEFER_SCALE=0 turns it off); ~5e-10, ~5 and ~5e9 fall inside,
# near both ends.
@pytest.mark.parametrize("factor", [1e-14, 1e-12, 1e-2, 1e7, 1e9], ids=lambda f: f"x{f:g}")
def test_gram_one_matrix_at_any_norm(gen, monkeypatch, factor):
    monkeypatch.setenv("MUONKERN_NS5_DEFER_SCALE", "1")
    G = randn(gen, 256, 1024, device="cuda") * factor
    poison_allocator()
    deferred = ns5(G, algorithm="gram")
    assert_ns5_output(deferred, G)
    if 1e-10 < factor * 512 < 1e10:   # the deferred path ran: bf16(G) and bf16(G/s) round apart
        monkeypatch.setenv("MUONKERN_NS5_DEFER_SCALE", "0")
        assert not torch.equal(deferred, ns5(G, algorithm="gram"))


# Without a restart (steps <= 3) the deferred 1/s rides on the last product: straight into a bf16 or
# fp32 output, or before the finish kernel (fp16). An odd element count (41 x 4101) takes the
# normalize kernel's element-by-element copy instead of 16-byte vectors. Pinned to the general path,
# which alone has the normalize kernel: 41 x 4101 would take the fused one.
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("shape,dtype", [((256, 1024), torch.float32), ((256, 1024), torch.bfloat16),
                                         ((256, 1024), torch.float16), ((41, 4101), torch.float32)],
                         ids=["fp32", "bf16", "fp16", "fp32-odd"])
def test_gram_one_matrix_without_restart(gen, monkeypatch, steps, shape, dtype):
    monkeypatch.setenv("MUONKERN_NS5_PATH", "general")
    monkeypatch.setenv("MUONKERN_NS5_DEFER_SCALE", "1")
    G = randn(gen, *shape, dtype=dtype, device="cuda")
    poison_allocator()
    assert_ns5_output(ns5(G, steps, algorithm="gram"), G, steps)


# One matrix runs a step's P Q and P R as one launch (a batch of two with P repeated), in the steps
# of a stretch that are neither its first nor its last: step 4 of 5 (restart after 2), step 6 of 7
# (restarts after 2 and 4). A batch of two matrices runs them apart, so the first matrix's result
# there is the same arithmetic up to the products' rounding (other GEMM algorithms, other fp32 sums
# before each bf16 rounding). Measured on an H100 over 12 inputs (python bench/ns5_diagnostics.py
# pair-spread): worst 0.0083 (5 steps) and 0.0129 (7 steps), median 0.0073 and 0.0111; budget
# PAIRED_RTOL about 2x the worst.
PAIRED_RTOL = 0.026


@pytest.mark.parametrize("steps", [5, 7])
def test_gram_one_matrix_paired_products(gen, monkeypatch, steps):
    monkeypatch.setenv("MUONKERN_NS5_PATH", "general")
    G = randn(gen, 2, 384, 1536, device="cuda")
    poison_allocator()
    one = ns5(G[0], steps, algorithm="gram")
    assert_ns5_output(one, G[0], steps)
    diff = relative_difference(one, ns5(G, steps, algorithm="gram")[0])
    assert diff <= PAIRED_RTOL, f"one matrix vs a batch of two: relative difference {diff:.4g}"


def test_gram_one_matrix_zero_and_nonfinite(gen, monkeypatch):
    """One wide matrix (the deferred-scale normalize): zeros give zeros, inf or NaN a non-finite output."""
    monkeypatch.setenv("MUONKERN_NS5_DEFER_SCALE", "1")
    out = ns5(torch.zeros(256, 1024, device="cuda"), algorithm="gram")
    assert (out == 0).all()
    for bad in (float("inf"), float("nan")):
        G = randn(gen, 256, 1024, device="cuda")
        G[7, 9] = bad
        assert not torch.isfinite(ns5(G, algorithm="gram")).all()


# The Gram iteration's symmetric products in blocks (csrc/ns5_cuda.cpp, BlockedProducts): X X^T from
# the short side MUONKERN_NS5_SPLIT_GRAM names, B = c R R + b R from MUONKERN_NS5_BLOCK_SQUARE's, each as
# the 10 lower blocks of a 4 x 4 grid in one pointer-array GEMM and a mirror kernel, for short sides that
# are multiples of 128. Low thresholds keep the shapes small: blocks of 64 and 96, a batch, tall, one wide
# matrix (its scale deferred); 264 is no multiple of 128 (one GEMM each). Each against float64 and, where
# blocked, against the same call with one GEMM per product (bf16 roundings in another order only).
BLOCKED = {"gram": ("256", "0"), "square": ("0", "256"), "both": ("256", "256")}


@pytest.mark.parametrize("blocked", list(BLOCKED))
@pytest.mark.parametrize("shape", [(256, 1032), (2, 384, 1000), (640, 256), (264, 1100)], ids=shape_id)
def test_blocked_symmetric_products(gen, monkeypatch, shape, blocked):
    monkeypatch.setenv("MUONKERN_NS5_DEFER_SCALE", "1")
    monkeypatch.setenv("MUONKERN_NS5_SPLIT_GRAM", BLOCKED[blocked][0])
    monkeypatch.setenv("MUONKERN_NS5_BLOCK_SQUARE", BLOCKED[blocked][1])
    G = randn(gen, *shape, device="cuda")
    poison_allocator()
    out = ns5(G, algorithm="gram")
    assert_ns5_output(out, G)
    if min(shape[-2:]) % 128 == 0:
        monkeypatch.setenv("MUONKERN_NS5_SPLIT_GRAM", "0")
        monkeypatch.setenv("MUONKERN_NS5_BLOCK_SQUARE", "0")
        diff = relative_difference(out, ns5(G, algorithm="gram"))
        assert diff <= BF16_RTOL, f"blocked ({blocked}) vs whole products: relative difference {diff:.4g}"


# The default thresholds at the sizes they were set for: blocks of 512 and of 544 (2176), a batch, tall.
@pytest.mark.parametrize("shape", [(2048, 2304), (2, 2176, 2400), (2304, 2048)], ids=shape_id)
def test_blocked_symmetric_products_at_default_sizes(gen, monkeypatch, shape):
    for name in ("MUONKERN_NS5_SPLIT_GRAM", "MUONKERN_NS5_BLOCK_SQUARE"):
        monkeypatch.delenv(name, raising=False)
    G = randn(gen, *shape, device="cuda")
    poison_allocator()
    out = ns5(G, algorithm="gram")
    assert_ns5_output(out, G)
    monkeypatch.setenv("MUONKERN_NS5_SPLIT_GRAM", "0")
    monkeypatch.setenv("MUONKERN_NS5_BLOCK_SQUARE", "0")
    diff = relative_difference(out, ns5(G, algorithm="gram"))
    assert diff <= BF16_RTOL, f"blocked vs whole products: relative difference {diff:.4g}"


@pytest.mark.parametrize("shape", [(12, 64, 768), (3, 768, 64), (1024, 4096), (2, 3, 40, 24)], ids=shape_id)
def test_gram_agrees_with_cpu(gen, shape):
    G = randn(gen, *shape)
    diff = relative_difference(ns5(G.cuda(), algorithm="gram"), ns5(G, algorithm="gram"))
    assert diff <= CROSS_DEVICE_RTOL, f"CUDA vs CPU relative difference {diff:.4g}"


# "auto" on CUDA: choose_algorithm's rule on the general path; on the fused kernel the Gram iteration
# wherever the cost model says it is no slower, whatever the short side (a matrix spread over a
# cluster of 8 reduces over it 2 times in 5 steps instead of 5).
@cuda_kernels
@pytest.mark.parametrize("shape,expected_path,algorithm", [
    ((12, 64, 768), "fused", "gram"),
    ((3, 768, 64), "fused", "gram"),          # tall
    ((132, 64, 512), "fused", "gram"),        # one block per matrix: fewer FLOPs alone
    ((1, 128, 600), "fused", "gram"),         # on 8 blocks where the standard iteration takes 4
    ((48, 128, 128), "fused", "standard"),    # square
    ((48, 96, 128), "fused", "standard"),     # 3:4, more FLOPs for the Gram iteration
    ((1024, 4096), "general", "gram"),
    ((768, 768), "general", "standard")], ids=shape_id)
def test_auto_route(shape, expected_path, algorithm):
    route = ns5_route(torch.empty(1, device="cuda").expand(*shape))
    assert (route.path, route.algorithm) == (expected_path, algorithm), route
    assert (route.cluster > 0) == (expected_path == "fused")


@cuda_kernels
@pytest.mark.parametrize("shape", [(1024, 4096), (4, 1024, 4096), (4096, 1024), (512, 1024), (12, 64, 768),
                                   (3, 768, 64)], ids=shape_id)
def test_auto_runs_the_chosen_algorithm(gen, shape):
    G = randn(gen, *shape, device="cuda")
    route = ns5_route(G)
    chosen = route.algorithm
    if route.path == "general":  # the FLOP rule there (the fused picks: test_auto_route)
        assert chosen == choose_algorithm(*shape[-2:], 5), route
    auto = ns5(G, algorithm="auto")
    assert torch.equal(auto, ns5(G, algorithm=chosen))
    assert torch.equal(auto, torch.ops.muonkern.ns5(G))  # the schema default
    assert rel_err(auto, ns5(G, algorithm="standard")).max().item() <= BF16_RTOL


def test_gram_side_stream(gen):
    check_side_stream(randn(gen, 2, 512, 2048, device="cuda"), algorithm="gram")


@pytest.mark.parametrize("args", [((4, 32, 96), 5, None, 1e-7, "gram"), ((2, 96, 32), 3, [1.5, -0.5, 0.0] * 3, 1e-6, "gram"),
                                  ((2, 32, 96), 5, None, 1e-7, "auto")], ids=["gram", "gram_tall", "auto"])
def test_gram_opcheck(gen, args):
    shape, *rest = args
    torch.library.opcheck(torch.ops.muonkern.ns5.default, (randn(gen, *shape, device="cuda"), *rest))


def test_gram_cuda_graph_replay(gen):
    static_in = randn(gen, 2, 512, 2048, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            ns5(static_in, algorithm="gram")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ns5(static_in, algorithm="gram")
    fresh = randn(gen, 2, 512, 2048, device="cuda")
    static_in.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, ns5(fresh, algorithm="gram"))


# The standard iteration on wgmma (csrc/kernels/ns5_wgmma.cu; on by default, off with
# MUONKERN_NS5_WGMMA=0): matrices of at most 128 x 128 on a compute capability 9.0 device, one block
# each, in place of the mma.sync fused kernel. Against float64, and against that kernel
# (MUONKERN_NS5_WGMMA=0) within the same bf16 budget: every dtype,
# tall inputs (transposed on load and store), a view with strides, leading batch dims, sizes that
# leave most of the 128 x 128 tile padding, one-row matrices.
hopper = pytest.mark.skipif(muonkern.backend() != "cuda" or torch.cuda.get_device_capability() != (9, 0),
                            reason="needs the CUDA kernels on a compute capability 9.0 GPU")
WGMMA_CASES = [((48, 128, 128), torch.float32), ((5, 100, 120), torch.float32), ((3, 128, 64), torch.float32),
               ((2, 3, 32, 40), torch.bfloat16), ((4, 128, 128), torch.float16), ((3, 72, 96), torch.float64),
               ((2, 1, 128), torch.float32), ((7, 9, 5), torch.float32), ((6, 120, 36), torch.bfloat16),
               ((3, 20, 36), torch.float32)]  # rows of 36: element loads (16-byte ones need whole 8-column chunks)


def wgmma_case_id(case):
    return f"{shape_id(case[0])}-{str(case[1]).removeprefix('torch.')}"


def on_wgmma(monkeypatch, G, **kwargs):
    """ns5(G, algorithm="standard") with the wgmma kernel on, into a NaN-poisoned allocator."""
    monkeypatch.delenv("MUONKERN_NS5_PATH", raising=False)
    monkeypatch.setenv("MUONKERN_NS5_WGMMA", "1")
    poison_allocator()
    return ns5(G, algorithm="standard", **kwargs)


def wgmma_vs_mma(monkeypatch, G, **kwargs):
    """(wgmma output, mma.sync fused-kernel output) of one call."""
    out = on_wgmma(monkeypatch, G, **kwargs)
    monkeypatch.setenv("MUONKERN_NS5_WGMMA", "0")
    return out, ns5(G, algorithm="standard", **kwargs)


@hopper
@pytest.mark.parametrize("case", WGMMA_CASES, ids=wgmma_case_id)
def test_wgmma_kernel(gen, monkeypatch, case):
    shape, dtype = case
    G = randn(gen, *shape, dtype=dtype, device="cuda")
    out, mma = wgmma_vs_mma(monkeypatch, G)
    assert_ns5_output(out, G)
    budget = assert_ns5_output(mma, G).max().item() + 0.05  # neither may stray far from the other's error
    diff = relative_difference(out, mma)
    assert diff <= max(budget, BF16_RTOL), f"wgmma vs mma.sync kernel: relative difference {diff:.4g}"


@hopper
@pytest.mark.parametrize("steps,coefficients,rtol", [(0, None, NORMALIZE_RTOL), (1, None, BF16_RTOL),
                                                     (8, None, BF16_RTOL), (5, POLAR_EXPRESS, POLAR_RTOL)],
                         ids=["steps0", "steps1", "steps8", "polar_express"])
def test_wgmma_kernel_schedules(gen, monkeypatch, steps, coefficients, rtol):
    G = randn(gen, 6, 96, 128, device="cuda")
    out = on_wgmma(monkeypatch, G, steps=steps, coefficients=coefficients)
    assert_ns5_output(out, G, steps=steps, coefficients=coefficients, rtol=rtol)


@hopper
@pytest.mark.parametrize("scale", [2.0 ** -70, 2.0 ** 60], ids=["2^-70", "2^60"])
def test_wgmma_kernel_input_scales(gen, monkeypatch, scale):
    """Norms far outside fp32's squares (the kernel sums them in double); powers of two leave the
    bf16 rounding unchanged, so the float64 budget holds after 5 steps and after 0."""
    G = randn(gen, 3, 64, 128, device="cuda") * scale
    assert_ns5_output(on_wgmma(monkeypatch, G), G)
    assert_ns5_output(on_wgmma(monkeypatch, G, steps=0), G, steps=0, rtol=NORMALIZE_RTOL)


@hopper
def test_wgmma_kernel_chained_calls_wait_for_their_input(gen, monkeypatch):
    """The wgmma kernel is a programmatic dependent launch too: a chain of its calls, each launched
    straight after the last, reads every input only after the kernel before has written it."""
    monkeypatch.delenv("MUONKERN_NS5_PATH", raising=False)
    monkeypatch.setenv("MUONKERN_NS5_WGMMA", "1")
    assert_chain_matches_synchronized(randn(gen, 48, 128, 128, device="cuda"), "standard")


@hopper
def test_wgmma_kernel_strided_view_zeros_and_nonfinite(gen, monkeypatch):
    monkeypatch.delenv("MUONKERN_NS5_PATH", raising=False)
    monkeypatch.setenv("MUONKERN_NS5_WGMMA", "1")
    G = randn(gen, 4, 128, 96, device="cuda").transpose(-2, -1)[:, :, 8:72]  # 4 x 96 x 64: rows 1 apart, columns 96
    assert_ns5_output(ns5(G), G)
    zeros = torch.zeros(3, 64, 128, device="cuda")
    assert (ns5(zeros) == 0).all()
    for bad in (float("inf"), float("nan")):
        H = randn(gen, 3, 64, 128, device="cuda")
        H[1, 5, 7] = bad
        out = ns5(H)
        assert not torch.isfinite(out[1]).all()
        assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()


@hopper
def test_wgmma_kernel_is_what_runs(gen, monkeypatch):
    """The route takes the wgmma kernel for the fused standard iteration up to 128 x 128 (one block a
    matrix), by default; the mma.sync kernel with MUONKERN_NS5_WGMMA=0 or past 128."""
    monkeypatch.delenv("MUONKERN_NS5_PATH", raising=False)

    def kernels(G):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            ns5(G, algorithm="auto")
            torch.cuda.synchronize()
        return " ".join(event.key for event in prof.key_averages())

    monkeypatch.delenv("MUONKERN_NS5_WGMMA", raising=False)  # on by default
    assert ns5_route(torch.empty(1, device="cuda").expand(48, 96, 128)) == ("fused", "standard", 1)
    # where "auto" picks the fused Gram iteration (faster there than the wgmma kernel) it keeps it
    assert ns5_route(torch.empty(1, device="cuda").expand(48, 64, 128)).algorithm == "gram"
    assert "ns5_wgmma_kernel" in kernels(randn(gen, 48, 128, 128, device="cuda"))
    assert "ns5_wgmma_kernel" not in kernels(randn(gen, 48, 128, 136, device="cuda"))
    monkeypatch.setenv("MUONKERN_NS5_WGMMA", "0")
    assert "ns5_wgmma_kernel" not in kernels(randn(gen, 48, 128, 128, device="cuda"))
    monkeypatch.setenv("MUONKERN_NS5_WGMMA", "1")
    assert "ns5_wgmma_kernel" in kernels(randn(gen, 4, 100, 120, device="cuda"))
