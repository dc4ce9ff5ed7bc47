"""The stream-K symmetric products and the Gram iteration on them (muonkern.ops.triton_gram).

GPU tests (skipped without CUDA or triton) hold ``symmetric_product`` against float64 products of
the same bf16 operands with NaN-poisoned outputs (a tile nobody finishes shows up), with one
program per SM and with a few programs (each then crosses many tiles), check that every flag is
zero again after a launch (a flag left raised would let the next launch read a stale partial sum)
and that repeated calls agree bitwise, and hold ``ns5_gram_symmetric`` against the float64
iteration, the bf16 reference Gram iteration and the exact polar factor. CPU tests run under
Triton's interpreter (float32 operands, as in tests/test_ns5_triton.py), where programs run one
after another: the split of tiles across programs is exercised in every way (a tile over 2..4
programs, programs with empty ranges, a program over several tiles), and a compile-only check
shows sm_90 code with wgmma and the acquire/release flag atomics.
"""
from __future__ import annotations

import types

import pytest
import torch

from muonkern.ops import triton_gram as tg
from muonkern.ops import triton_graphs as tgr
from muonkern.ops.fallback import ns5_reference
from muonkern.ops.ns5_routing import ns5_route
from interpreter import run_interpreter
from ns5_cases import (assert_polar_margin, check_nonfinite_isolated, check_zero_matrices, ill_conditioned,
                       relative_difference, shape_id)
from sm90_compile import SHARED_LIMIT_BYTES, run_compile_script
from reference import CROSS_DEVICE_RTOL, JORDAN, POLAR_EXPRESS, POLAR_RTOL, assert_ns5_output, randn
from symmetric_products import assert_symmetric_product, poisoned

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and tg.triton is not None),
                               reason="needs a CUDA GPU and triton")
needs_triton = pytest.mark.skipif(tg.triton is None, reason="needs triton")


def flags_raised() -> int:
    """Flags left raised in every cached workspace (0 after complete launches)."""
    return sum(int(flags.count_nonzero()) for _, flags in tg._workspaces.values())


def test_graph_cache_bounds_the_layouts_it_remembers(monkeypatch):
    """Layouts seen once are remembered up to MAX_SEEN_LAYOUTS; past that a new layout runs eagerly
    on every call, while a remembered one still gets its graph on its second call. (CPU: the lookup
    allocates the graph's input buffer and captures nothing.)"""
    monkeypatch.setattr(tgr, "MAX_SEEN_LAYOUTS", 3)
    for name in ("_graphs", "_seen", "_failed"):
        monkeypatch.setattr(tgr, name, type(getattr(tgr, name))())
    stream = types.SimpleNamespace(cuda_stream=0)

    def lookup(i):
        return tgr.graphed_factors((1, 8, 8 + i), torch.float32, torch.device("cpu"), stream, ())

    assert all(lookup(i) is None for i in range(5))
    assert len(tgr._seen) == 3
    assert lookup(4) is None, "a layout past the bound was remembered"
    assert isinstance(lookup(0), tgr.GraphedFactors), "a remembered layout was not given its graph"


def test_graph_pays_where_an_h100_host_outlasts_the_gpu():
    """The H100 fit (bench/NOTES.md, *The stream-K kernel on an H100*): an eager 2048x8192 call took
    1397 us against 820 replayed, and 8x1024x4096 1175 against 1165; the host's ~1.3 ms of
    launches hide behind the GPU's work from 4096x16384 (~7 ms) on."""
    for shape in [(1, 768, 3072), (1, 1024, 4096), (1, 2048, 8192), (8, 1024, 4096)]:
        assert tgr.graph_pays(*shape, 5), shape
    for shape in [(1, 4096, 16384), (16, 2048, 8192), (1, 8192, 32768)]:
        assert not tgr.graph_pays(*shape, 5), shape


# ---- GPU ---------------------------------------------------------------------------------------

# Multiples of the tiles (64, 128) and not, tall views, batched, large enough for many 128-tiles.
XXT_SHAPES = [(64, 64), (200, 300), (384, 96), (3, 130, 257), (2, 512, 1024), (1000, 1000), (1, 1)]


@needs_gpu
@pytest.mark.parametrize("programs", [None, 7], ids=["one-per-SM", "7-programs"])
@pytest.mark.parametrize("orientation", ["X·Xᵀ", "X·Xᵀ of a view", "Xᵀ·X"])
@pytest.mark.parametrize("shape", XXT_SHAPES, ids=shape_id)
def test_gram_product_matches_float64(gen, shape, orientation, programs):
    if orientation == "X·Xᵀ of a view":   # X is the transpose of a contiguous tensor: read in place
        X = randn(gen, *shape[:-2], shape[-1], shape[-2], dtype=torch.bfloat16, device="cuda").mT
    else:
        X = randn(gen, *shape, dtype=torch.bfloat16, device="cuda")
    A, B = (X.mT, X) if orientation == "Xᵀ·X" else (X, X.mT)
    out = poisoned((*A.shape[:-1], A.size(-2)))
    C = tg.symmetric_product(A, B, out=out, programs=programs)
    assert C.data_ptr() == out.data_ptr()
    A64 = A.double()
    assert_symmetric_product(C, A64 @ A64.mT, A64, A.size(-1))
    assert flags_raised() == 0
    assert torch.equal(tg.symmetric_product(A, B, programs=programs), C), "two calls differ"


def commuting_pair(gen, batch: int, m: int):
    """(R, P, Q): R = X Xᵀ of a normalized X (m×2m), P = b·R + c·R² + a·I and Q = P², rounded to
    bf16 (symmetric, commuting up to that rounding), as the Gram iteration sees them."""
    X = randn(gen, batch, m, 2 * m, dtype=torch.float64)
    X = X / torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    R = X @ X.mT
    a, b, c = JORDAN
    P = b * R + c * R @ R + a * torch.eye(m, dtype=torch.float64)
    return tuple(t.to(torch.bfloat16).cuda() for t in (R, P, P @ P))


@needs_gpu
@pytest.mark.parametrize("programs", [None, 5], ids=["one-per-SM", "5-programs"])
@pytest.mark.parametrize("shape", [(1, 64), (3, 130), (2, 512), (1, 1000)], ids=lambda s: f"{s[0]}x{s[1]}²")
def test_commuting_products_and_polynomial_match_float64(gen, shape, programs):
    R, P, Q = commuting_pair(gen, *shape)
    m = shape[-1]
    # P·Q: of two commuting symmetric matrices, the upper triangle of tiles stands for the whole
    C = tg.symmetric_product(P, Q, out=poisoned(P.shape), programs=programs)
    P64, Q64 = P.double().cpu(), Q.double().cpu()
    ref = P64 @ Q64
    # the rounded operands commute only up to their rounding: the kernel's upper triangle of P·Q is
    # off the symmetric part of P·Q by half of P·Q - Q·P, which the bound takes in (terms are
    # scaled by 2^-23 there, hence the 2^23)
    assert_symmetric_product(C, (ref + ref.mT) / 2, P64, m, cols=Q64.mT,
                             terms=(P64 @ Q64 - Q64 @ P64).abs() * 2 ** 23)
    # c·R·R + b·R + a·I in one epilogue
    a, b, c = JORDAN
    C = tg.symmetric_product(R, R, c, R, b, a, out=poisoned(R.shape), programs=programs)
    R64 = R.double().cpu()
    eye = torch.eye(m, dtype=torch.float64)
    assert_symmetric_product(C, c * R64 @ R64 + b * R64 + a * eye, abs(c) ** 0.5 * R64, m,
                             terms=abs(b) * R64.abs() + abs(c) * (R64.abs() @ R64.abs()) + a * eye)
    assert flags_raised() == 0


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 130, 300), (512, 2048), (640, 160), (3, 256, 1024), (2, 2, 96, 384)],
                         ids=shape_id)
def test_ns5_gram_symmetric_matches_reference(gen, shape, dtype):
    G = randn(gen, *shape, dtype=dtype, device="cuda")
    out = tg.ns5_gram_symmetric(G)
    assert_ns5_output(out, G)   # the float64 iteration, within the bf16 budget (tests/reference.py)
    ref = ns5_reference(G, algorithm="gram")
    assert relative_difference(out, ref) <= CROSS_DEVICE_RTOL
    assert_polar_margin(out, ref, G)
    assert flags_raised() == 0


@needs_gpu
def test_ns5_gram_symmetric_ill_conditioned_and_polar_express(gen):
    G = ill_conditioned(gen, 2, 256, 1024).float().cuda()
    out, ref = tg.ns5_gram_symmetric(G), ns5_reference(G, algorithm="gram")
    assert_polar_margin(out, ref, G)
    G = randn(gen, 4, 128, 512, device="cuda")
    assert_ns5_output(tg.ns5_gram_symmetric(G, 5, POLAR_EXPRESS), G, 5, POLAR_EXPRESS, rtol=POLAR_RTOL)


@needs_gpu
def test_ns5_gram_symmetric_zero_and_nonfinite_matrices(gen):
    """Zero matrices give zeros and a non-finite one stays in its own output, beside regular ones."""
    check_zero_matrices(gen, "cuda", shape=(3, 128, 256), run=tg.ns5_gram_symmetric)
    check_nonfinite_isolated(gen, "cuda", shape=(5, 96, 512), run=tg.ns5_gram_symmetric)
    assert flags_raised() == 0


@needs_gpu
def test_graph_replays_match_eager_calls(gen, monkeypatch):
    """A layout runs eagerly when first seen, is captured on its second call and replayed after;
    with the cache full a new layout runs eagerly. Replays (normalization and output product outside
    the graph) are bitwise the eager calls for contiguous inputs (new values on every call: wide and
    tall, fp32, bf16, fp16 and 4-D, Polar Express, a set number of programs), and close for a strided view
    (cuBLAS may take another algorithm for the strided eager operand)."""
    monkeypatch.setattr(tgr, "GRAPH_CACHE_SIZE", 6)
    for name in ("_graphs", "_seen", "_failed"):
        monkeypatch.setattr(tgr, name, type(getattr(tgr, name))())
    cases = [((2, 256, 1024), torch.float32, {}), ((640, 160), torch.float32, {}),
             ((2, 2, 96, 384), torch.bfloat16, {}), ((256, 1024), torch.float32, {"coefficients": POLAR_EXPRESS}),
             ((256, 1024), torch.float32, {"programs": 7}), ((3, 200, 700), torch.float16, {})]
    steps = 5
    for i, (shape, dtype, kwargs) in enumerate(cases):
        for call in range(3):
            G = randn(gen, *shape, dtype=dtype, device="cuda")
            replayed = tg.ns5_gram_symmetric(G, steps, graph=True, **kwargs)
            assert torch.equal(replayed, tg.ns5_gram_symmetric(G, steps, graph=False, **kwargs)), (shape, call)
            assert len(tgr._graphs) == i + (call > 0), "captured on the second call"
        assert_ns5_output(replayed, G, steps, kwargs.get("coefficients"),
                          rtol=POLAR_RTOL if "coefficients" in kwargs else None)
    extra = randn(gen, 3, 128, 512, device="cuda")   # the cache is full: eager, never captured
    for _ in range(3):
        assert torch.equal(tg.ns5_gram_symmetric(extra, graph=True), tg.ns5_gram_symmetric(extra, graph=False))
    assert len(tgr._graphs) == len(cases) and flags_raised() == 0
    view = randn(gen, 2, 1024, 256, device="cuda").mT
    # the same iteration but for the accumulation order of the strided operand's products: a few
    # bf16 roundings (u = 2^-8 each) apart, 1e-2 ~ 2.5 u (a wrong product is off by O(1))
    for _ in range(3):
        assert relative_difference(tg.ns5_gram_symmetric(view, graph=True), tg.ns5_gram_symmetric(view, graph=False)) <= 1e-2


@needs_gpu
def test_ns5_op_routes_forced_symmetric_gram_calls(gen, monkeypatch):
    """Under MUONKERN_NS5_PATH=symmetric the op hands a call that runs the Gram algorithm to
    muonkern::ns5_gram_symmetric (bitwise: the stream-K kernel sums partials in a fixed order), a
    standard one to muonkern::ns5_symmetric; "auto" does not take the stream-K route."""
    G = randn(gen, 2, 3, 96, 384, device="cuda")
    monkeypatch.setenv("MUONKERN_NS5_PATH", "symmetric")
    routed = torch.ops.muonkern.ns5(G, algorithm="gram")
    assert torch.equal(routed, torch.ops.muonkern.ns5_gram_symmetric(G))
    assert torch.equal(torch.ops.muonkern.ns5(G, algorithm="standard"), torch.ops.muonkern.ns5_symmetric(G))
    assert_ns5_output(routed, G)
    # "auto" runs the path ns5_route names (the fused kernel or cuBLASLt), not the routed result
    monkeypatch.setenv("MUONKERN_NS5_PATH", "auto")
    route = ns5_route(G, algorithm="gram")
    auto = torch.ops.muonkern.ns5(G, algorithm="gram")
    monkeypatch.setenv("MUONKERN_NS5_PATH", route.path)
    assert torch.equal(auto, torch.ops.muonkern.ns5(G, algorithm="gram"))
    assert not torch.equal(auto, routed)


@needs_gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="wgmma is Hopper's (sm_90)")
def test_wgmma_on_sm90(gen):
    from muonkern.ops.triton_symmetric import wgmma_in_ptx
    X = randn(gen, 1, 512, 1024, dtype=torch.bfloat16, device="cuda")
    C = torch.empty(1, 512, 512, dtype=torch.bfloat16, device="cuda")
    compiled = tg._launch(X, X.mT, C, 1.0, None, 0.0, 0.0, tg.CONFIGS[0], None)
    assert wgmma_in_ptx(compiled)


# ---- CPU: Triton's interpreter -----------------------------------------------------------------

_INTERPRETER_SCRIPT = r"""
import json, sys
import torch
from muonkern.ops import triton_gram as tg
from reference import ns5_float64, POLAR_EXPRESS

gen = torch.Generator().manual_seed(int(sys.argv[1]))
report = {}

def max_rel(C, ref):
    return float(((C.double() - ref).abs().max() / ref.abs().max()).item())

# 1. X Xᵀ and Xᵀ X on 16-tiles, into NaN-poisoned outputs. Programs: 1 (all tiles in one range),
#    2 and 5 (tiles split across programs), 40 (more programs than iterations: empty ranges, a tile
#    over up to 4 programs).
products = []
for shape, tall in [((37, 50), False), ((3, 20, 70), False), ((64, 16), False), ((50, 33), True),
                    ((1, 1), False)]:
    X = torch.randn(*shape, generator=gen)
    A, B = (X.mT, X) if tall else (X, X.mT)
    ref = A.double() @ B.double()
    for programs in (1, 2, 5, 40):
        out = torch.full(ref.shape, float("nan"))
        C = tg.symmetric_product(A, B, out=out, programs=programs)
        products.append({"case": [list(shape), tall, programs], "nan": bool(C.isnan().any()),
                         "symmetric": bool(torch.equal(C, C.mT)), "same_out": C.data_ptr() == out.data_ptr(),
                         "err": max_rel(C, ref)})
# 2. c·R·R + b·R + a·I and P·Q for commuting symmetric P, Q (polynomials in one R), bf16 out too
for m, programs in [(45, 3), (2, 1), (33, 7)]:
    X = torch.randn(2, m, 2 * m, generator=gen, dtype=torch.float64)
    R = X @ X.mT / (2 * m)
    P = 2.0 * R @ R - 4.0 * R + 3.0 * torch.eye(m, dtype=torch.float64)
    Q = P @ P
    cases = [("poly", (R.float(), R.float(), 2.0, R.float(), -4.0, 3.0), P),
             ("P·Q", (P.float(), Q.float()), P @ Q)]
    for name, args, ref in cases:
        for out_dtype in (torch.float32, torch.bfloat16):
            out = torch.full(ref.shape, float("nan"), dtype=out_dtype)
            C = tg.symmetric_product(*args, out=out, programs=programs)
            products.append({"case": [name, m, programs, str(out_dtype)], "bf16": out_dtype == torch.bfloat16,
                             "nan": bool(C.isnan().any()), "symmetric": bool(torch.equal(C, C.mT)),
                             "same_out": C.data_ptr() == out.data_ptr(), "err": max_rel(C, ref)})
report["products"] = products

# 3. The Gram iteration with float32 operands against the float64 iteration: wide, tall, 4-D,
#    Polar Express, 7 steps (two restarts), steps = 0 and 1, square
ns5 = []
for shape, coefficients, steps, programs in [((2, 24, 40), None, 5, 3), ((40, 24), None, 5, None),
                                             ((3, 20, 36), POLAR_EXPRESS, 5, 6), ((2, 2, 20, 50), None, 7, 4),
                                             ((2, 24, 40), None, 0, None), ((24, 40), None, 1, 2),
                                             ((20, 20), None, 3, None)]:
    G = torch.randn(*shape, generator=gen)
    out = tg.ns5_gram_symmetric(G, steps, coefficients, dtype=torch.float32, programs=programs, graph=True)
    ref = ns5_float64(G, steps, coefficients)
    ns5.append({"case": [list(shape), steps, programs], "same_shape": list(out.shape) == list(shape),
                "contiguous": out.is_contiguous(), "err": float(((out.double() - ref).norm() / ref.norm()).item())})
report["ns5"] = ns5
report["flags_raised"] = sum(int(f.count_nonzero()) for _, f in tg._workspaces.values())

# 4. Clear errors on bad arguments
errors = []
for args, kwargs in [((torch.ones(4, 5), torch.ones(4, 5)), {}),
                     ((torch.ones(4, 5), torch.ones(5, 4)), {"out": torch.ones(4, 5)}),
                     ((torch.ones(4, 4), torch.ones(4, 4)), {"D": torch.ones(3, 3)}),
                     ((torch.ones(4, 4, dtype=torch.float64), torch.ones(4, 4)), {}),
                     ((torch.ones(4, 4), torch.ones(4, 4, dtype=torch.bfloat16)), {}),
                     ((torch.ones(4, 5), torch.ones(5, 4)), {"programs": 0}),
                     ((torch.ones(4, 5), torch.ones(5, 4)), {"config": tg.SyrkConfig(256, 64, 8, 3)})]:
    try:
        tg.symmetric_product(*args, **kwargs)
        errors.append(None)
    except (ValueError, TypeError) as e:
        errors.append(str(e))
A = torch.ones(4, 4)
try:
    tg.symmetric_product(A, A, out=A)
    errors.append(None)
except ValueError as e:
    errors.append(str(e))
report["errors"] = errors
print(json.dumps(report))
"""


@needs_triton
def test_kernel_and_iteration_under_interpreter(gen):
    """Triton's CPU interpreter on 16×16 tiles (TRITON_INTERPRET=1 must be set before triton is
    imported, hence a subprocess). About half a minute."""
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    report = run_interpreter(_INTERPRETER_SCRIPT, str(seed))
    for row in report["products"]:
        assert not row["nan"] and row["symmetric"] and row["same_out"], row
        # float32 out: exact-input products summed in fp32 (a few ulps of the largest entry, 1e-5
        # leaves room for K = 70); bf16 out: one conversion, which the interpreter truncates (2^-7)
        assert row["err"] <= (2.0 ** -7 if row.get("bf16") else 1e-5), row
    for row in report["ns5"]:
        # float32 operands: each step's rounding (~1e-7) grows by the polynomial's gain of ~10 per
        # step; measured ~1e-6 (Polar Express ~7e-6), budget 1e-4 (a wrong step or restart is off by > 0.07)
        assert row["same_shape"] and row["contiguous"] and row["err"] <= 1e-4, row
    assert report["flags_raised"] == 0, "a launch left flags raised"
    messages = report["errors"]
    assert all(messages), f"a bad argument was accepted: {messages}"
    for message, expected in zip(messages, ["B must have shape", "out must have shape", "D must have shape",
                                            "share one dtype", "share one dtype", "programs must be >= 1",
                                            "config.block must be at most 128", "share memory"]):
        assert expected in message, (expected, message)


_COMPILE_SCRIPT = r"""
import json, re
from muonkern.ops import triton_gram as tg
from sm90_compile import compile_sm90, sm90_summary

results = []
for cfg in tg.CONFIGS:
    for has_linear, k_major in [(False, True), (False, False), (True, True)]:
        # A row-major (stride along K is 1) or a transposed view (stride along M is 1), B = Aᵀ as a
        # view of the same memory
        units = ["s_ak", "s_bk"] if k_major else ["s_am", "s_bn"]
        units += ["s_dn", "s_cn"]
        signature = {"A": "*bf16", "B": "*bf16", "D": "*bf16", "C": "*bf16", "WS": "*fp32", "FLAGS": "*i32",
                     "M": "i32", "K": "i32", "BATCH": "i32"}
        for name in ["s_ab", "s_am", "s_ak", "s_bb", "s_bk", "s_bn", "s_db", "s_dm", "s_dn", "s_cb", "s_cm", "s_cn"]:
            signature[name] = "constexpr" if name in units else ("i64" if name.endswith("b") else "i32")
        signature.update(alpha="fp32", beta="fp32", gamma="fp32")
        meta = {"HAS_LINEAR": has_linear, "HAS_DIAGONAL": has_linear, "BLOCK": cfg.block,
                "BLOCK_K": cfg.block_k, "GROUP": cfg.group, "DOT_PRECISION": "tf32"}
        signature.update({k: "constexpr" for k in meta})
        divisible = [n for n in ["A", "B", "D", "C", "WS", "FLAGS", "M", "K", "s_ab", "s_am", "s_ak", "s_bb",
                                 "s_bk", "s_bn", "s_db", "s_dm", "s_cb", "s_cm"] if n not in units]
        kernel = compile_sm90(tg._streamk_kernel, signature, {**{u: 1 for u in units}, **meta}, divisible,
                              cfg.num_warps, cfg.num_stages)
        ptx = kernel.asm["ptx"]
        results.append({"case": [cfg.block, cfg.block_k, has_linear, k_major], **sm90_summary(kernel),
                        "atomics": sorted(set(re.findall(r"(?:atom|ld|st)\.global\.[a-z0-9._]+", ptx))),
                        "partials_bypass_l1": "ld.global.cg" in ptx})
print(json.dumps({"results": results}))
"""


@needs_triton
def test_compiles_to_wgmma_for_sm90():
    """Compile only (no GPU needed, tests/sm90_compile.py): for sm_90 every configuration issues
    wgmma.mma_async (no mma.sync), raises flags with a release exchange and spins on them with
    acquire loads at GPU scope, reads partial sums past L1, fits one program per SM in shared
    memory (at most 227 KB) and spills no registers (cuobjdump's resource usage)."""
    for row in run_compile_script(_COMPILE_SCRIPT):
        print({k: row.get(k) for k in ("case", "wgmma_shapes", "registers", "spill_bytes", "shared_bytes")})
        assert row["wgmma"] and not row["mma_sync"] and row["partials_bypass_l1"], row
        assert any(a.startswith("ld.global.gpu.acquire") or (a.startswith("atom.") and ".gpu.acquire" in a)
                   for a in row["atomics"]), row
        assert any(a.startswith("atom.global.gpu.release") for a in row["atomics"]), row
        assert row["shared_bytes"] <= SHARED_LIMIT_BYTES, row
        assert row["spill_bytes"] == 0, row   # -rP prints the rows (triton 3.8: 202-228 registers at 128² tiles, 128-134 at 64²)
