"""The Triton symmetric-product kernels (muonkern.ops.triton_symmetric): X Xᵀ, a·I + b·A + c·A·A and the
ns5 iteration built on them.

GPU tests (skipped without CUDA or triton) hold the kernels against float64 products of the same
bf16 operands, with every output element poisoned with NaN beforehand so that a tile the kernel
never writes shows up, and ns5_symmetric against the bf16 reference iteration and the exact polar
factor. CPU tests run everywhere triton is installed: the kernels under Triton's interpreter
(float32 operands: the interpreter of triton 3.8 multiplies bf16 operands as their raw 16-bit
patterns, so it cannot check the bf16 path), a compile-only check that sm_90 code uses wgmma, and
the import without triton.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from muonkern.ops import triton_symmetric as ts
from muonkern.ops.fallback import ns5_reference
from interpreter import run_interpreter
from ns5_cases import assert_polar_margin, relative_difference, shape_id
from sm90_compile import run_compile_script
from symmetric_products import assert_symmetric_product, poisoned
from reference import (CROSS_DEVICE_RTOL, NORMALIZE_RTOL, POLAR_EXPRESS, POLAR_RTOL,
                       assert_ns5_output, randn)

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and ts.available()),
                               reason="needs a CUDA GPU and triton")
needs_triton = pytest.mark.skipif(not ts.available(), reason="needs triton")


# ---- GPU ---------------------------------------------------------------------------------------

# Multiples of the tiles (64, 128) and not, a 1x1, tall, batched, and large enough for 128-tiles.
XXT_SHAPES = [(64, 64), (1, 1), (200, 300), (384, 96), (3, 130, 257), (4, 96, 80), (2, 512, 1024),
              (1000, 1000)]


# the autotuned tiles (square and wide), and each wide configuration by itself
TILE_CONFIGS = [None, *ts.WIDE_CONFIGS]


def config_id(config) -> str:
    return "autotuned" if config is None else f"wide{config.block}x{2 * config.block}s{config.num_stages}"


@needs_gpu
@pytest.mark.parametrize("config", TILE_CONFIGS, ids=config_id)
@pytest.mark.parametrize("transposed_view", [False, True], ids=["contiguous", "mT-view"])
@pytest.mark.parametrize("shape", XXT_SHAPES, ids=shape_id)
def test_xxt_matches_float64(gen, shape, transposed_view, config):
    if transposed_view:  # X is the transpose of a contiguous (…, n, m) tensor: read in place
        X = randn(gen, *shape[:-2], shape[-1], shape[-2], dtype=torch.bfloat16, device="cuda").mT
    else:
        X = randn(gen, *shape, dtype=torch.bfloat16, device="cuda")
    out = poisoned((*shape[:-1], shape[-2]))
    C = ts.xxt(X, out=out, config=config)
    assert C.data_ptr() == out.data_ptr() and C.shape == out.shape
    X64 = X.double()
    assert_symmetric_product(C, X64 @ X64.mT, X64, shape[-1])


@needs_gpu
def test_xxt_new_output_and_float32_output(gen):
    X = randn(gen, 2, 300, 520, dtype=torch.bfloat16, device="cuda")
    X64 = X.double()
    C = ts.xxt(X)
    assert C.dtype == torch.bfloat16 and C.shape == (2, 300, 300) and C.is_contiguous()
    assert_symmetric_product(C, X64 @ X64.mT, X64, 520)
    # an fp32 output keeps the accumulator: only the fp32 summation error is left
    C32 = ts.xxt(X, out=poisoned((2, 300, 300), torch.float32))
    assert_symmetric_product(C32, X64 @ X64.mT, X64, 520, out_rtol=0.0)


def ns_like_gram(gen, shape) -> torch.Tensor:
    """A = X Xᵀ of a Frobenius-normalized X, as ns5 feeds the polynomial (bf16, symmetric)."""
    X = randn(gen, *shape, dtype=torch.float64)
    X = X / torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    return (X @ X.mT).to(torch.bfloat16).cuda()


def random_symmetric(gen, *shape) -> torch.Tensor:
    A = randn(gen, *shape, dtype=torch.float64)
    return ((A + A.mT) / 2).to(torch.bfloat16).cuda()


@needs_gpu
@pytest.mark.parametrize("config", TILE_CONFIGS, ids=config_id)
@pytest.mark.parametrize("kind", ["ns-gram", "random"])
@pytest.mark.parametrize("shape", [(64, 64), (3, 130, 130), (2, 512, 512), (1000, 1000), (1, 1)], ids=shape_id)
def test_symmetric_polynomial_matches_float64(gen, shape, kind, config):
    m = shape[-1]
    A = ns_like_gram(gen, (*shape[:-1], 2 * m)) if kind == "ns-gram" else random_symmetric(gen, *shape)
    a, b, c = 3.4445, -4.7750, 2.0315
    out = poisoned(shape)
    P = ts.symmetric_polynomial(A, b, c, out=out, config=config, a=a)
    assert P.data_ptr() == out.data_ptr()
    A64 = A.double()
    I = torch.eye(m, dtype=torch.float64, device=A.device)
    # |c| scales the product's accumulation error; c·acc + b·A + a·I rounds once more in fp32
    assert_symmetric_product(P, a * I + b * A64 + c * (A64 @ A64), abs(c) ** 0.5 * A64, m,
                             terms=a * I + abs(b) * A64.abs() + abs(c) * (A64.abs() @ A64.abs()))


@needs_gpu
@pytest.mark.parametrize("kind", ["xxt", "polynomial"])
def test_large_outputs_run_the_fixed_wide_tiles(gen, kind):
    """From LARGE_M output rows a launch that names no configuration runs LARGE_M_CONFIG (wide
    tiles: m64n256k16 wgmma on Hopper) and matches float64 (poisoned output)."""
    m = ts.LARGE_M
    X = randn(gen, m, 64, dtype=torch.bfloat16, device="cuda")
    A = ns_like_gram(gen, (m, 64)) if kind == "polynomial" else X
    a, b, c = (3.4445, -4.7750, 2.0315) if kind == "polynomial" else (0.0, 0.0, 1.0)
    C = poisoned((1, m, m))
    compiled = ts._launch(A.unsqueeze(0), C, c, b, kind == "polynomial", None, a)
    if torch.cuda.get_device_capability() == (9, 0):
        assert "m64n256k16" in compiled.asm["ptx"]
    A64 = A.double()
    if kind == "xxt":
        assert_symmetric_product(C[0], A64 @ A64.mT, A64, 64)
    else:
        I = torch.eye(m, dtype=torch.float64, device="cuda")
        assert_symmetric_product(C[0], a * I + b * A64 + c * (A64 @ A64), abs(c) ** 0.5 * A64, m,
                                 terms=a * I + abs(b) * A64.abs() + abs(c) * (A64.abs() @ A64.abs()))


def test_default_config_fixes_large_outputs_only():
    assert ts.default_config(ts.LARGE_M) == ts.default_config(4 * ts.LARGE_M) == ts.LARGE_M_CONFIG
    assert ts.LARGE_M_CONFIG.wide
    assert ts.default_config(ts.LARGE_M - 1) is None   # the autotuner's
    assert ts.default_config(ts.LARGE_M, interpreted=True) == ts.INTERPRETER_CONFIG


@needs_gpu
def test_symmetric_polynomial_rejects_aliasing_and_bad_shapes(gen):
    A = random_symmetric(gen, 64, 64)
    with pytest.raises(ValueError, match="share memory"):
        ts.symmetric_polynomial(A, 1.0, 1.0, out=A)
    with pytest.raises(ValueError, match="square"):
        ts.symmetric_polynomial(A[:, :32], 1.0, 1.0)
    with pytest.raises(ValueError, match="out must have shape"):
        ts.xxt(A, out=torch.empty(64, 63, device="cuda"))


# Wide and tall, batched, non-multiples of the tiles, a strided (transposed) input, 2-D and 3-D.
NS5_SHAPES = [(2, 130, 300), (512, 512), (640, 512), (3, 256, 1024), (768, 3072)]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", NS5_SHAPES, ids=shape_id)
def test_ns5_symmetric_matches_reference(gen, shape, dtype):
    G = randn(gen, *shape, dtype=dtype, device="cuda")
    out = ts.ns5_symmetric(G)
    # the float64 iteration, within the bf16 budget every ns5 implementation has (tests/reference.py)
    assert_ns5_output(out, G)
    ref = ns5_reference(G, algorithm="standard")
    # two bf16 runs of the same iteration differ by their rounding only
    assert relative_difference(out, ref) <= CROSS_DEVICE_RTOL
    # and ours is no farther from the exact polar factor than the reference (same margin as gram)
    assert_polar_margin(out, ref, G)


@needs_gpu
def test_ns5_symmetric_polar_express_views_and_edges(gen):
    G = randn(gen, 4, 256, 128, device="cuda")
    assert_ns5_output(ts.ns5_symmetric(G, 5, POLAR_EXPRESS), G, 5, POLAR_EXPRESS, rtol=POLAR_RTOL)
    view = randn(gen, 3, 512, 200, device="cuda").mT     # wide, non-contiguous
    assert_ns5_output(ts.ns5_symmetric(view), view)
    assert_ns5_output(ts.ns5_symmetric(G, 0), G, steps=0, rtol=NORMALIZE_RTOL)
    empty = torch.empty(0, 64, 32, device="cuda")
    assert ts.ns5_symmetric(empty).shape == empty.shape
    with pytest.raises(ValueError, match="2-D or 3-D"):
        ts.ns5_symmetric(torch.ones(2, 2, 8, 8, device="cuda"))


@needs_gpu
def test_ns5_op_takes_the_symmetric_route(gen, monkeypatch):
    """muonkern::ns5 on CUDA hands large matrices on Hopper (short side >= 4096) to
    muonkern::ns5_symmetric, which MUONKERN_NS5_PATH=symmetric forces at any size (here a 4-D
    batch, which the op reshapes) and MUONKERN_NS5_PATH=general never takes. Routed results are
    bitwise the symmetric op's; the cuBLAS path rounds in another order, so its result differs."""
    monkeypatch.setenv("MUONKERN_NS5_PATH", "symmetric")
    small = randn(gen, 2, 3, 40, 72, device="cuda")
    out = torch.ops.muonkern.ns5(small)
    assert out.shape == small.shape and out.is_contiguous()
    assert torch.equal(out, torch.ops.muonkern.ns5_symmetric(small))
    assert_ns5_output(out, small)
    monkeypatch.setenv("MUONKERN_NS5_PATH", "general")
    assert not torch.equal(torch.ops.muonkern.ns5(small), out)
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the automatic route is measured on Hopper only")
    G = randn(gen, 4096, 4096, device="cuda")
    monkeypatch.setenv("MUONKERN_NS5_PATH", "auto")
    routed = torch.ops.muonkern.ns5(G)
    assert torch.equal(routed, torch.ops.muonkern.ns5_symmetric(G))
    monkeypatch.setenv("MUONKERN_NS5_PATH", "general")
    general = torch.ops.muonkern.ns5(G)
    assert not torch.equal(routed, general)
    assert relative_difference(routed, general) <= CROSS_DEVICE_RTOL


@needs_gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="wgmma is Hopper's (sm_90)")
@pytest.mark.parametrize("config", [ts.CONFIGS[0], ts.WIDE_CONFIGS[0]], ids=["square", "wide"])
@pytest.mark.parametrize("case", ["xxt", "xxt-mT-view", "polynomial"])
def test_wgmma_on_sm90(gen, case, config):
    """The compiled kernel issues warp-group MMAs (wgmma.mma_async), not Ampere's mma.sync."""
    X = randn(gen, 1, 512, 1024, dtype=torch.bfloat16, device="cuda")
    if case == "xxt-mT-view":
        X = randn(gen, 1, 1024, 512, dtype=torch.bfloat16, device="cuda").mT
    if case == "polynomial":
        X = X[..., :512]
    C = torch.empty(1, 512, 512, dtype=torch.bfloat16, device="cuda")
    compiled = ts._launch(X, C, 1.0, 0.5 if case == "polynomial" else 0.0, case == "polynomial", config)
    assert ts.wgmma_in_ptx(compiled)


# ---- CPU: Triton's interpreter -----------------------------------------------------------------

_INTERPRETER_SCRIPT = r"""
import itertools, json, sys
import torch
import triton
import triton.language as tl
from muonkern.ops import triton_symmetric as ts
from reference import ns5_float64, POLAR_EXPRESS

gen = torch.Generator().manual_seed(int(sys.argv[1]))
report = {}

# 1. The tile order: every upper-triangle tile exactly once, for grids of 1..13 tiles a side and
#    bands of 1, 2, 3 and 8 rows (partial last bands included).
@triton.jit
def count_tiles(counts, T, GROUP: tl.constexpr):
    row, col = ts._upper_tile(tl.program_id(0), T, GROUP)
    tl.atomic_add(counts + row * T + col, 1)

bad = []
for T in range(1, 14):
    for group in (1, 2, 3, 8):
        counts = torch.zeros(T, T, dtype=torch.int32)
        count_tiles[(T * (T + 1) // 2,)](counts, T, GROUP=group)
        if not torch.equal(counts, torch.ones(T, T, dtype=torch.int32).triu()):
            bad.append([T, group])
report["tile_order_bad"] = bad

def max_rel(C, ref):
    return float(((C.double() - ref).abs().max() / ref.abs().max()).item())

# 2. X Xᵀ on shapes that are not multiples of the 16-tiles, batched, 1x1 and a transposed view,
#    into outputs poisoned with NaN; float32 operands (exact-input products), float32 and bf16 out;
#    square 16-tiles and wide 16x32 ones (16x16: the lower row half of the one wide tile lies wholly
#    past M; 100x20: four wide tiles a side in two bands)
CONFIGS = [ts.INTERPRETER_CONFIG, ts.INTERPRETER_WIDE_CONFIG]
xxt = []
for (shape, view), config in itertools.product(
        [((37, 50), False), ((3, 70, 33), False), ((1, 1), False), ((16, 16), False),
         ((2, 40, 96), True), ((53, 7), False), ((100, 20), False)], CONFIGS):
    if view:
        X = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).mT
    else:
        X = torch.randn(*shape, generator=gen)
    ref = X.double() @ X.double().mT
    for out_dtype in (torch.float32, torch.bfloat16):
        out = torch.full(ref.shape, float("nan"), dtype=out_dtype)
        C = ts.xxt(X, out=out, config=config)
        xxt.append({"shape": list(shape), "view": view, "wide": config.wide, "out": str(out_dtype),
                    "nan": bool(C.isnan().any()), "symmetric": bool(torch.equal(C, C.mT)),
                    "same_out": C.data_ptr() == out.data_ptr(), "err": max_rel(C, ref)})
report["xxt"] = xxt

# 3. a I + b A + c A A on symmetric A (a = 0 and the first step's a)
poly = []
for (shape, a), config in itertools.product([((45, 45), 0.0), ((2, 33, 33), 3.4445), ((1, 1), 3.4445)], CONFIGS):
    A = torch.randn(*shape, generator=gen)
    A = (A + A.mT) / 2
    out = torch.full(shape, float("nan"))
    P = ts.symmetric_polynomial(A, -4.775, 2.0315, out=out, config=config, a=a)
    ref = a * torch.eye(shape[-1], dtype=torch.float64) - 4.775 * A.double() + 2.0315 * A.double() @ A.double()
    poly.append({"shape": list(shape), "wide": config.wide, "nan": bool(P.isnan().any()),
                 "symmetric": bool(torch.equal(P, P.mT)), "same_out": P.data_ptr() == out.data_ptr(),
                 "err": max_rel(P, ref)})
report["poly"] = poly

# 4. The whole iteration with float32 operands against its float64 replica (wide, tall, 2-D,
#    Polar Express's per-step triples, steps = 0 and 1, wide tiles)
ns5 = []
for shape, coefficients, steps, config in [
        ((2, 24, 40), None, 5, None), ((40, 24), None, 5, None), ((3, 20, 20), POLAR_EXPRESS, 5, None),
        ((2, 24, 40), None, 0, None), ((2, 24, 40), None, 1, None), ((40, 24), None, 1, None),
        ((2, 40, 72), None, 5, ts.INTERPRETER_WIDE_CONFIG)]:
    G = torch.randn(*shape, generator=gen)
    out = ts.ns5_symmetric(G, steps, coefficients, config=config, dtype=torch.float32)
    ref = ns5_float64(G, steps, coefficients)
    err = float(((out.double() - ref).norm() / ref.norm()).item())
    ns5.append({"shape": list(shape), "same_shape": list(out.shape) == list(shape),
                "contiguous": out.is_contiguous(), "err": err})
report["ns5"] = ns5
print(json.dumps(report))
"""


@needs_triton
def test_kernels_under_interpreter(gen):
    """The kernels, run by Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before triton
    is imported, hence a subprocess), on 16×16 tiles in bands of 2 tile rows. A few seconds."""
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    report = run_interpreter(_INTERPRETER_SCRIPT, str(seed))
    assert report["tile_order_bad"] == [], "(tiles a side, band rows) whose tile order misses or repeats a tile"
    for row in report["xxt"] + report["poly"]:
        assert not row["nan"] and row["symmetric"] and row["same_out"], row
        # float32 out: exact-input products summed in fp32 (a few ulps); bf16 out: one conversion,
        # which the interpreter truncates (2^-7 relative; a GPU rounds to nearest, 2^-8)
        assert row["err"] <= (2.0 ** -7 if row.get("out") == "torch.bfloat16" else 1e-5), row
    for row in report["ns5"]:
        # float32 operands: the rounding of each step (~1e-7) grows by the polynomial's gain of
        # ~10 per step; measured ~1e-6, budget 1e-4 (a wrong step or triple is off by > 0.1)
        assert row["same_shape"] and row["contiguous"] and row["err"] <= 1e-4, row


_COMPILE_SCRIPT = r"""
import json
from muonkern.ops import triton_symmetric as ts
from sm90_compile import compile_sm90, sm90_summary

results = []
for has_linear, k_major, cfg, out in [(False, True, ts.CONFIGS[0], "bf16"), (False, False, ts.CONFIGS[0], "bf16"),
                                      (True, True, ts.CONFIGS[0], "bf16"), (False, True, ts.WIDE_CONFIGS[0], "bf16"),
                                      (True, True, ts.WIDE_CONFIGS[0], "bf16"), (False, True, ts.WIDE_CONFIGS[0], "fp32")]:
    # X row-major (stride along K is 1) or a transposed view (stride along M is 1)
    unit = "stride_xk" if k_major else "stride_xm"
    signature = {"X": "*bf16", "C": "*" + out, "M": "i32", "K": "i32", "BATCH": "i32", "stride_xb": "i64",
                 "stride_xm": "i32", "stride_xk": "i32", "stride_cb": "i64", "stride_cm": "i32",
                 "stride_cn": "constexpr", "alpha": "fp32", "beta": "fp32", "gamma": "fp32", "HAS_LINEAR": "constexpr",
                 "BLOCK": "constexpr", "BLOCK_K": "constexpr", "GROUP": "constexpr", "DOT_PRECISION": "constexpr",
                 "WIDE": "constexpr"}
    signature[unit] = "constexpr"
    constexprs = {unit: 1, "stride_cn": 1, "HAS_LINEAR": has_linear, "BLOCK": cfg.block,
                  "BLOCK_K": cfg.block_k, "GROUP": cfg.group, "DOT_PRECISION": "tf32", "WIDE": cfg.wide}
    divisible = ["X", "C", "M", "K", "stride_xb", "stride_xk" if unit == "stride_xm" else "stride_xm",
                 "stride_cb", "stride_cm"]
    kernel = compile_sm90(ts._syrk_kernel, signature, constexprs, divisible, cfg.num_warps, cfg.num_stages)
    results.append({"case": [has_linear, k_major, cfg.wide, out], "cp_async": "cp.async" in kernel.asm["ptx"],
                    **sm90_summary(kernel)})
print(json.dumps({"results": results}))
"""


@needs_triton
def test_compiles_to_wgmma_for_sm90():
    """Compile only (no GPU needed, tests/sm90_compile.py): for sm_90 the kernel's PTX issues
    wgmma.mma_async (m64n256k16 with wide tiles) and pipelines its loads with cp.async, for a
    row-major X, a transposed view and the polynomial's epilogue, and the bf16 outputs ns5 writes
    spill nothing. Prints each case's registers and spilled bytes (-rP), a float32 output's too."""
    for row in run_compile_script(_COMPILE_SCRIPT):
        print(row)
        has_linear, k_major, wide, out = row["case"]
        assert row["wgmma"] and not row["mma_sync"] and row["cp_async"], row
        assert ("m64n256k16" in row["wgmma_shapes"]) == wide, row
        if out == "bf16":
            assert row.get("spill_bytes", 0) == 0, row


def test_module_imports_without_triton():
    """The package and this module import without triton; the kernels then say why they cannot run."""
    script = ("import sys; sys.modules['triton'] = None\n"
              "import torch, muonkern\n"
              "from muonkern.ops import triton_symmetric as ts\n"
              "assert not ts.available()\n"
              "try:\n    ts.xxt(torch.ones(4, 4))\nexcept RuntimeError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "triton is not installed" in proc.stdout


@pytest.mark.parametrize("operand", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_normalize_sums_in_float32_and_rounds_once(gen, dtype, operand):
    """ns5_symmetric's normalization (plain torch, no triton needed): the norm summed in float32
    (float64 for a float64 G) whatever G's dtype, the quotient rounded once to the operand dtype.
    Entries of ~300 over 3×256×256 make a norm of ~7.7e4 per matrix, past float16's largest value
    (65504): a norm taken in a float16 G's own dtype is inf, and every element 0."""
    G = (300 * randn(gen, 3, 256, 256, dtype=torch.float32)).to(dtype)
    X = ts.normalize(G, operand, 1e-7)
    assert X.dtype == operand and X.shape == G.shape
    G64 = G.double()
    exact = G64 / (torch.linalg.vector_norm(G64, dim=(-2, -1), keepdim=True) + 1e-7)
    # one rounding to the operand dtype (unit roundoff 2^-8 bf16, 2^-11 fp16) of a quotient whose
    # float32 norm is off by ~2^-20 (well inside that slack); fp16's subnormals below 2^-14 are
    # spaced 2^-24 apart
    u = 2.0 ** -8 if operand == torch.bfloat16 else 2.0 ** -11
    assert ((X.double() - exact).abs() <= u * exact.abs() + 2.0 ** -24).all()
    out = torch.empty_like(X)
    assert ts.normalize(G, operand, 1e-7, out=out).data_ptr() == out.data_ptr()


@pytest.mark.parametrize("transposed", [False, True], ids=["wide", "tall"])
def testlast_product_orientation_and_dtype(gen, transposed):
    """ns5_symmetric's last step: P·X (wide) or, for a tall G, Xᵀ·P, which is (P·X)ᵀ because P is
    symmetric, written as the tall matrix itself (contiguous) in G's dtype. On the CPU it converts a
    bf16 product; the float32 output straight from cuBLAS (``out_dtype=``) runs in the GPU tests of
    ns5_symmetric above."""
    P = randn(gen, 2, 24, 24, dtype=torch.float64)
    P = ((P + P.mT) / 2).to(torch.bfloat16)
    X = randn(gen, 2, 24, 40, dtype=torch.bfloat16)
    out = ts.last_product(P, X, transposed, torch.float32)
    want = P.double() @ X.double()
    want = want.mT if transposed else want
    assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == want.shape
    # bf16 operands, fp32 accumulation over 24 terms, one bf16 rounding on the CPU path (2^-8)
    assert relative_difference(out, want) <= 2.0 ** -8
