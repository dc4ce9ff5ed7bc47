"""ns5 of small matrices in one Triton launch, one program per matrix (muonkern.ops.triton_small).

GPU tests (skipped without CUDA or triton) hold ``ns5_small`` against the float64 iteration, the
bf16 reference and the exact polar factor on the shapes it is for (short side <= 128: wide, tall,
batched, 4-D, sizes that are not powers of two), with zero and non-finite matrices beside regular
ones. CPU tests run it under Triton's interpreter with float32 operands (16-column chunks, so every
shape streams several chunks) and compile it for sm_90 without a GPU (wgmma in the PTX).
"""
from __future__ import annotations

import pytest
import torch

from muonkern.ops import triton_small as tsm
from muonkern.ops.fallback import ns5_reference
from interpreter import run_interpreter
from ns5_cases import (assert_polar_margin, check_nonfinite_isolated, check_zero_matrices, relative_difference,
                       shape_id)
from sm90_compile import SHARED_LIMIT_BYTES, run_compile_script
from reference import (CROSS_DEVICE_RTOL, NORMALIZE_RTOL, POLAR_EXPRESS, POLAR_RTOL,
                       assert_ns5_output, randn)

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and tsm.triton is not None),
                               reason="needs a CUDA GPU and triton")
needs_triton = pytest.mark.skipif(tsm.triton is None, reason="needs triton")

SHAPES = [(48, 128, 128), (12, 64, 768), (12, 768, 64), (3, 100, 300), (2, 2, 37, 90), (8, 24, 24), (5, 1, 40)]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_float64_and_reference(gen, shape, dtype):
    G = randn(gen, *shape, dtype=dtype, device="cuda")
    out = tsm.ns5_small(G)
    assert_ns5_output(out, G)   # within the bf16 budget every ns5 has (tests/reference.py)
    ref = ns5_reference(G, algorithm="standard")
    if min(shape[-2:]) < 8:
        # CROSS_DEVICE_RTOL's and the margin's premise: rounding differences average out over many
        # singular values (a one-row matrix has one: its distance is one value's rounding path)
        return
    assert relative_difference(out, ref) <= CROSS_DEVICE_RTOL
    # no farther from the exact polar factor than the reference, beyond another rounding order's
    # margin (the one the Gram iteration is held to)
    assert_polar_margin(out, ref, G)


@needs_gpu
@pytest.mark.parametrize("config", tsm.CONFIGS, ids=lambda c: f"chunk{c[0]}-warps{c[1]}")
def test_every_config(gen, config):
    shapes = [s for s in [(6, 64, 200), (4, 128, 72)] if tsm._fits(config, tsm._block_m(min(s[-2:])))]
    assert shapes, f"no shape here runs {config}"
    for shape in shapes:
        G = randn(gen, *shape, device="cuda")
        assert_ns5_output(tsm.ns5_small(G, config=config), G)


@needs_gpu
def test_schedules_edges_and_errors(gen):
    G = randn(gen, 4, 64, 256, device="cuda")
    assert_ns5_output(tsm.ns5_small(G, 5, POLAR_EXPRESS), G, 5, POLAR_EXPRESS, rtol=POLAR_RTOL)
    assert_ns5_output(tsm.ns5_small(G, 0), G, steps=0, rtol=NORMALIZE_RTOL)
    # steps = 0 runs the kernel's normalization alone: the reference's roundings (bf16 G, norm and
    # quotient), so the two differ by at most one bf16 ulp (where the fp32 sums round differently)
    Gb = G.bfloat16()
    X0, ref0 = tsm.ns5_small(Gb, 0).float(), ns5_reference(Gb, 0).float()
    assert ((X0 - ref0).abs() <= 2.0 ** -7 * ref0.abs()).all()
    assert_ns5_output(tsm.ns5_small(G, 1), G, steps=1)
    view = randn(gen, 3, 200, 96, device="cuda").mT     # wide, non-contiguous
    assert_ns5_output(tsm.ns5_small(view), view)
    assert tsm.ns5_small(torch.empty(0, 64, 32, device="cuda")).shape == (0, 64, 32)
    check_zero_matrices(gen, "cuda", shape=(3, 32, 96), run=tsm.ns5_small)
    check_nonfinite_isolated(gen, "cuda", shape=(5, 100, 120), run=tsm.ns5_small)   # 128-row programs
    with pytest.raises(ValueError, match="at most 128"):
        tsm.ns5_small(torch.ones(2, 129, 200, device="cuda"))
    with pytest.raises(ValueError, match="chunk"):
        tsm.ns5_small(G, config=(256, 4))
    with pytest.raises(ValueError, match="one of"):
        tsm.ns5_small(G, config=(32, 8))   # faults on an H100 (triton 3.6): not launched


@needs_gpu
def test_ns5_op_routes_forced_small_calls(gen, monkeypatch):
    """Under MUONKERN_NS5_PATH=small the op hands standard calls with a short side <= 128 to
    muonkern::ns5_small (bitwise: one program per matrix, a fixed order of operations); a longer
    short side, or "auto", runs the op's own kernels (bitwise the fused or the general path's)."""
    G = randn(gen, 2, 6, 64, 200, device="cuda")
    monkeypatch.setenv("MUONKERN_NS5_PATH", "small")
    routed = torch.ops.muonkern.ns5(G, algorithm="standard")
    assert torch.equal(routed, torch.ops.muonkern.ns5_small(G))
    assert_ns5_output(routed, G)
    wide = randn(gen, 2, 160, 200, device="cuda")
    not_routed = torch.ops.muonkern.ns5(wide, algorithm="standard")
    monkeypatch.setenv("MUONKERN_NS5_PATH", "auto")
    assert torch.equal(not_routed, torch.ops.muonkern.ns5(wide, algorithm="standard"))
    auto = torch.ops.muonkern.ns5(G, algorithm="standard")
    own = []
    for path in ("fused", "general"):
        monkeypatch.setenv("MUONKERN_NS5_PATH", path)
        own.append(torch.ops.muonkern.ns5(G, algorithm="standard"))
    assert any(torch.equal(auto, out) for out in own), "auto took neither of the op's own paths"
    assert not torch.equal(auto, routed)


# ---- CPU: Triton's interpreter -----------------------------------------------------------------

_INTERPRETER_SCRIPT = r"""
import json, sys
import torch
from muonkern.ops import triton_small as tsm
from reference import ns5_float64, POLAR_EXPRESS

gen = torch.Generator().manual_seed(int(sys.argv[1]))
rows = []
for shape, coefficients, steps in [((3, 24, 40), None, 5), ((40, 24), None, 5), ((2, 20, 20), POLAR_EXPRESS, 5),
                                   ((2, 2, 5, 70), None, 3), ((1, 1), None, 2), ((2, 3, 70), None, 1),
                                   ((4, 130, 17), None, 5), ((2, 24, 40), None, 0)]:
    G = torch.randn(*shape, generator=gen)
    out = tsm.ns5_small(G, steps, coefficients, dtype=torch.float32)
    ref = ns5_float64(G, steps, coefficients)
    rows.append({"case": [list(shape), steps], "same_shape": list(out.shape) == list(shape),
                 "contiguous": out.is_contiguous(), "err": float(((out.double() - ref).norm() / ref.norm()).item())})
# zero and non-finite matrices beside a regular one
Z = torch.zeros(3, 8, 40)
Z[1] = torch.randn(8, 40, generator=gen)
Z[2, 1, 2] = float("inf")
out = tsm.ns5_small(Z, dtype=torch.float32)
ref = ns5_float64(Z[1])
isolation = {"zeros": bool((out[0] == 0).all()), "nonfinite": not bool(torch.isfinite(out[2]).all()),
             "regular_err": float(((out[1].double() - ref).norm() / ref.norm()).item())}
errors = []
for G, kwargs in [(torch.ones(2, 129, 200), {}), (torch.ones(8, 8), {"config": (256, 4)})]:
    try:
        tsm.ns5_small(G, **kwargs)
        errors.append(None)
    except ValueError as e:
        errors.append(str(e))
print(json.dumps({"rows": rows, "isolation": isolation, "errors": errors}))
"""


@needs_triton
def test_kernel_under_interpreter(gen):
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    report = run_interpreter(_INTERPRETER_SCRIPT, str(seed))
    for row in report["rows"]:
        # float32 operands: each step's rounding (~1e-7) grows by the polynomial's gain of ~10 per
        # step; measured ~1e-6 (Polar Express ~3e-6), budget 1e-4 (a wrong step or chunk is off by > 0.1)
        assert row["same_shape"] and row["contiguous"] and row["err"] <= 1e-4, row
    iso = report["isolation"]
    assert iso["zeros"] and iso["nonfinite"] and iso["regular_err"] <= 1e-4, iso
    assert all(report["errors"]), report["errors"]
    assert "at most 128" in report["errors"][0] and "chunk" in report["errors"][1], report["errors"]


_COMPILE_SCRIPT = r"""
import json
from muonkern.ops import triton_small as tsm
from sm90_compile import compile_sm90, sm90_summary

results = []
for block_m in (128, 64):
    for chunk, warps in tsm.CONFIGS:
        if not tsm._fits((chunk, warps), block_m):
            continue
        # wide and tall; at 64 rows also one-row matrices
        for tall, one_row in [(False, False), (True, False)] + ([(False, True), (True, True)] if block_m == 64 else []):
            units = ["s_gm", "s_om"] if tall else ["s_gn", "s_on"]
            signature = {"G": "*fp32", "OUT": "*fp32", "SCRATCH": "*bf16", "COEF": "*fp32", "M": "i32", "N": "i32",
                         "steps": "i32", "eps": "fp32", "s_gb": "i64", "s_gm": "i32", "s_gn": "i32", "s_ob": "i64",
                         "s_om": "i32", "s_on": "i32", "s_sb": "i64", "s_sm": "i32",
                         "BLOCK_M": "constexpr", "CHUNK": "constexpr", "DOT_PRECISION": "constexpr"}
            constexprs = {"BLOCK_M": block_m, "CHUNK": chunk, "DOT_PRECISION": "tf32"}
            for u in units:
                signature[u] = "constexpr"
                constexprs[u] = 1
            if one_row:   # M specialized to the constant 1, as the launcher does for one-row matrices
                signature["M"] = "constexpr"
                constexprs["M"] = 1
            divisible = [n for n in ["G", "OUT", "SCRATCH", "COEF", "N", "s_gb", "s_gm", "s_gn", "s_ob", "s_om",
                                     "s_on", "s_sb", "s_sm"] if n not in units]
            kernel = compile_sm90(tsm._ns5_small_kernel, signature, constexprs, divisible, warps, tsm.NUM_STAGES)
            results.append({"case": [block_m, chunk, warps, tall, one_row], **sm90_summary(kernel)})
print(json.dumps({"results": results}))
"""


@needs_triton
def test_compiles_to_wgmma_for_sm90():
    """Compile only (no GPU needed, tests/sm90_compile.py): every configuration the launcher may
    pick, wide and tall (and one-row matrices), issues wgmma.mma_async (no mma.sync) for sm_90 and
    spills no registers."""
    results = run_compile_script(_COMPILE_SCRIPT)
    assert {tuple(r["case"][:3]) for r in results} >= {(128, 64, 8), (64, 64, 4), (64, 128, 4)}
    assert any(r["case"][4] for r in results)
    for row in results:
        print({k: row.get(k) for k in ("case", "wgmma_shapes", "registers", "spill_bytes", "shared_bytes")})
        assert row["wgmma"] and not row["mma_sync"] and row["shared_bytes"] <= SHARED_LIMIT_BYTES, row
        assert row["spill_bytes"] == 0, row
