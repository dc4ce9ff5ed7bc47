"""ns5 benchmarks: muonkern vs the reference implementations, side by side in one process.

GPU (the baseline shapes, fp32 inputs):
  muonkern            torch.ops.muonkern.ns5 (our kernels; path chosen by the op, see MUONKERN_NS5_PATH),
                      algorithm="auto" (the default); labelled "muonkern (auto: gram)" where auto runs
                      the Gram iteration. Multi-launch calls replay cached CUDA graphs (launch-bound
                      ones always, others within MUONKERN_NS5_GRAPH_MB)
  muonkern direct     the same with MUONKERN_NS5_GRAPH=0 (every kernel launched by the host), timed on
                      GRAPH_SHAPES, the launch-bound ones, where graphs save most
  muonkern standard   algorithm="standard" and algorithm="gram" side by side, on the Gram shapes only
  muonkern gram       (GRAM_SHAPES; TFLOP/s of every row count the standard iteration's FLOPs)
  reference           bench/reference_ns5.py, eager: KellerJordan/Muon's iteration as written
  reference_compiled  torch.compile of the reference (default mode, one static graph per shape)
  torch_optim_muon    torch.optim.Muon's internal _zeropower_via_newtonschulz (2-D only)
  muonkern triton-sym muonkern.ops.triton_symmetric.ns5_symmetric: X Xᵀ and a·I + b·A + c·A·A by the
                      Triton symmetric kernels, P·X by cuBLAS; timed on the shapes whose short side is
                      >= 512. The op itself takes this route on Hopper from a short side of 4096
                      (csrc/ns5_cuda.cpp), so there the "muonkern" row times the same computation;
                      MUONKERN_NS5_PATH=general times the cuBLAS path instead
  muonkern triton-gram muonkern.ops.triton_gram.ns5_gram_symmetric: the Gram iteration with every
                      symmetric product on the Triton stream-K kernel (one program per SM), the two
                      products that touch X on cuBLAS; timed on the Gram shapes. The op takes it under
                      MUONKERN_NS5_PATH=symmetric, not in auto (slower on an H100: README)
  muonkern triton-small muonkern.ops.triton_small.ns5_small: one Triton program per matrix, all steps in
                      one launch (wgmma on Hopper), on the shapes with a short side <= 128, beside the
                      op's CUDA fused kernel (mma.sync); the op takes it under MUONKERN_NS5_PATH=small,
                      not in auto (slower on an H100: README)
X Xᵀ alone (bf16, GPU): muonkern.ops.triton_symmetric.xxt and the stream-K
muonkern.ops.triton_gram.symmetric_product vs torch.matmul(X, X.mT), its own table
(xxt_bench.md/.json) with reference-equivalent TFLOP/s: the dense product's 2m²n FLOPs / the time.
CPU (runs when no GPU is present, or with MUONKERN_BENCH_CPU=1): muonkern (and its algorithms on
CPU_GRAM_SHAPES) vs reference.

    python -m pytest bench -q
"""
from __future__ import annotations

import os

import pytest
import torch
from measure import built_table, environment, markdown, register_report, rotating_inputs, shape_str, time_rotating
from reference_ns5 import reference_ns5

from muonkern.ops import triton_gram, triton_small, triton_symmetric
from muonkern.ops.ns5_args import JORDAN_COEFFICIENTS
from muonkern.ops.ns5_routing import ns5_route

# Wide (1:4) and tall shapes where "auto" may pick the Gram iteration, and 12x64x768 (the fused
# kernel's Gram iteration, which "auto" takes there): timed with each algorithm.
GRAM_SHAPES = [(768, 3072), (1024, 4096), (2048, 8192), (8, 1024, 4096), (4096, 1024), (12, 64, 768)]
CPU_GRAM_SHAPES = [(512, 2048)]
GPU_SHAPES = [(768, 768), (768, 3072), (1024, 4096), (4096, 4096), (8192, 8192),
              (48, 128, 128), (12, 64, 768), (8, 1024, 4096), (2048, 8192), (4096, 1024)]
CPU_SHAPES = [(4, 64, 256), (256, 256), *CPU_GRAM_SHAPES]
GPU_IMPLS = ["reference", "muonkern", "muonkern direct", "muonkern standard", "muonkern gram",
             "reference_compiled", "torch_optim_muon", "muonkern triton-sym", "muonkern triton-gram",
             "muonkern triton-small"]
# Launch-bound shapes, where the op replays CUDA graphs (csrc/ns5_cuda.cpp, launch_bound).
GRAPH_SHAPES = [(768, 768), (768, 3072), (1024, 4096)]
TRITON_SYM_MIN_SHORT_SIDE = 512
CPU_IMPLS = ["reference", "muonkern", "muonkern standard", "muonkern gram"]
ALGORITHM_IMPLS = {"muonkern standard": "standard", "muonkern gram": "gram"}

_compiled_reference = None


def _muonkern(G):
    return torch.ops.muonkern.ns5(G, 5, None, 1e-7)


def _reference(G):
    return reference_ns5(G)


def _reference_compiled(G):
    global _compiled_reference
    if _compiled_reference is None:
        # One static graph per shape (dynamic=False), as modded-nanogpt compiles it; room for all shapes.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        _compiled_reference = torch.compile(reference_ns5, dynamic=False)
    return _compiled_reference(G)


def _torch_optim_muon(G):
    from torch.optim._muon import _zeropower_via_newtonschulz
    return _zeropower_via_newtonschulz(G, ns_coefficients=JORDAN_COEFFICIENTS, ns_steps=5, eps=1e-7)


def _triton_sym(G):
    return triton_symmetric.ns5_symmetric(G, 5, None, 1e-7)


def _triton_gram(G):
    return triton_gram.ns5_gram_symmetric(G, 5, None, 1e-7)


def _triton_small(G):
    return triton_small.ns5_small(G, 5, None, 1e-7)


IMPLS = {"muonkern": _muonkern, "reference": _reference, "reference_compiled": _reference_compiled,
         "torch_optim_muon": _torch_optim_muon, "muonkern triton-sym": _triton_sym,
         "muonkern triton-gram": _triton_gram,
         "muonkern triton-small": _triton_small,
         **{impl: (lambda G, a=algorithm: torch.ops.muonkern.ns5(G, 5, None, 1e-7, a))
            for impl, algorithm in ALGORITHM_IMPLS.items()}}


def muonkern_label(shape, device: str) -> str:
    """The default call's row label: "muonkern (auto: gram)" where auto runs the Gram iteration, and
    "(fallback)" where a build without our CUDA kernels runs the pure-PyTorch code on the GPU."""
    route = ns5_route(torch.empty(1, device=device).expand(*shape), 5)
    label = "muonkern (auto: gram)" if route.algorithm == "gram" else "muonkern"
    return label + " (fallback)" if route.path == "fallback" else label


def _time_impl(time_ns5, shape, impl: str, device: str, gram_shapes) -> None:
    """Times one impl; the algorithm rows only on the Gram shapes, and the default call labelled with
    the algorithm "auto" picks where it is the Gram one."""
    if impl in ALGORITHM_IMPLS and tuple(shape) not in gram_shapes:
        pytest.skip("algorithm rows are timed on the Gram shapes only")
    time_ns5(IMPLS[impl], shape, muonkern_label(shape, device) if impl == "muonkern" else impl, device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: no CUDA GPU")
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=shape_str)
def test_ns5_cuda(time_ns5, monkeypatch, shape, impl):
    if impl == "muonkern direct":
        if tuple(shape) not in GRAPH_SHAPES:
            pytest.skip("direct launches are timed on GRAPH_SHAPES only (launch-bound)")
        monkeypatch.setenv("MUONKERN_NS5_GRAPH", "0")
        time_ns5(_muonkern, shape, impl, "cuda")
        return
    if impl == "torch_optim_muon":
        try:
            from torch.optim._muon import _zeropower_via_newtonschulz  # noqa: F401
        except ImportError:
            pytest.skip("this torch has no torch.optim._muon")
        if len(shape) != 2:
            pytest.skip("torch.optim.Muon's Newton-Schulz takes 2-D matrices only")
    if impl.startswith("muonkern triton-") and not triton_symmetric.available():
        pytest.skip("triton is not installed")
    if impl == "muonkern triton-small" and min(shape[-2:]) > triton_small.MAX_SHORT_SIDE:
        pytest.skip(f"one program per matrix takes a short side of at most {triton_small.MAX_SHORT_SIDE}")
    if impl == "muonkern triton-gram" and tuple(shape) not in GRAM_SHAPES:
        pytest.skip("the Gram iteration is timed on the Gram shapes only")
    if impl == "muonkern triton-sym":
        if min(shape[-2:]) < TRITON_SYM_MIN_SHORT_SIDE:
            pytest.skip(f"symmetric tiles pay off from a short side of {TRITON_SYM_MIN_SHORT_SIDE}")
    _time_impl(time_ns5, shape, impl, "cuda", GRAM_SHAPES)


@pytest.mark.skipif(torch.cuda.is_available() and os.environ.get("MUONKERN_BENCH_CPU") != "1",
                    reason="CPU benchmark runs without a GPU, or with MUONKERN_BENCH_CPU=1")
@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=shape_str)
def test_ns5_cpu(time_ns5, shape, impl):
    _time_impl(time_ns5, shape, impl, "cpu", CPU_GRAM_SHAPES)


# ---- grouped: the matrices of one optimizer step ----------------------------------------------

def gpt2_small_matrices(device: str, seed: int = 0) -> list[torch.Tensor]:
    """The hidden matrices of a GPT-2-small Muon step: 12 layers of four 768×768 (q, k, v, o), one
    768×3072 and one 3072×768 (MLP), fp32 and random (never zeros)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = [(768, 768)] * 4 + [(768, 3072), (3072, 768)]
    return [torch.randn(s, device=device, generator=gen) for _ in range(12) for s in shapes]


GROUPED = [("loop of reference", None, lambda Gs: [_reference(G) for G in Gs]),
           ("loop of muonkern.ns5", "loop of reference", lambda Gs: [_muonkern(G) for G in Gs]),
           ("muonkern.ns5_grouped", "loop of reference", lambda Gs: torch.ops.muonkern.ns5_grouped(Gs, 5, None, 1e-7))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: no CUDA GPU")
@pytest.mark.parametrize("impl,reference,fn", GROUPED, ids=[g[0] for g in GROUPED])
def test_ns5_grouped_gpt2_small(time_probe, impl, reference, fn):
    Gs = gpt2_small_matrices("cuda")
    time_probe(lambda: fn(Gs), "ns5 of a GPT-2-small step's 72 matrices", impl, reference=reference)


# ---- X Xᵀ alone: the Triton symmetric kernel against cuBLAS's dense product --------------------

XXT_SHAPES = [(4096, 4096), (8192, 8192), (1024, 4096), (2048, 8192), (2048, 2048), (1024, 1024)]
XXT_IMPLS = {"torch.matmul": lambda X: torch.matmul(X, X.mT),
             "muonkern triton xxt": lambda X: triton_symmetric.xxt(X),
             "muonkern stream-K xxt": lambda X: triton_gram.symmetric_product(X, X.mT)}
_XXT_RESULTS: list[dict] = []


def _xxt_rows() -> list[dict]:
    """The X Xᵀ rows with their ratio against torch.matmul's row of the same shape."""
    dense = {r["shape"]: r["median_ms"] for r in _XXT_RESULTS if r["impl"] == "torch.matmul"}
    return [{**r, "ratio_vs_matmul": dense[r["shape"]] / r["median_ms"] if r["shape"] in dense else None}
            for r in _XXT_RESULTS]


def _xxt_environment() -> dict:
    return {**environment(), "triton": getattr(triton_symmetric.triton, "__version__", None)}


def _xxt_report(rows: list[dict], env: dict) -> str:
    cells = [[r["shape"], r["impl"], f"{r['median_ms']:.4f}",
              "—" if r["ratio_vs_matmul"] is None else f"{r['ratio_vs_matmul']:.2f}x",
              f"{r['tflops']:.1f}"] for r in rows]
    return markdown("X Xᵀ benchmark: Triton symmetric kernels vs torch.matmul (bf16)", env,
                    "Median per call (k calls then one synchronize per timed round); ratio = torch.matmul "
                    "time / this impl's time (> 1 is faster); TFLOP/s counted as the dense product's "
                    "2m^2n for both (reference-equivalent: the symmetric kernel does about half of that "
                    "work).", ["shape (m×n)", "impl", "median ms", "ratio vs torch.matmul",
                               "reference-equivalent TFLOP/s"], cells)


@pytest.fixture
def record_xxt():
    """Appends a row to the X Xᵀ table (added to the run's reports on first use)."""
    register_report("xxt_bench", lambda: built_table(_xxt_rows(), _xxt_report, _xxt_environment))
    return _XXT_RESULTS.append


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: no CUDA GPU")
@pytest.mark.parametrize("impl", list(XXT_IMPLS))
@pytest.mark.parametrize("shape", XXT_SHAPES, ids=shape_str)
def test_xxt_cuda(benchmark, record_xxt, shape, impl):
    if impl != "torch.matmul" and not triton_symmetric.available():
        pytest.skip("triton is not installed")
    m, n = shape
    inputs = rotating_inputs(shape, "cuda", dtype=torch.bfloat16)
    benchmark.group = f"xxt cuda {m}x{n}"
    benchmark.extra_info.update(impl=impl, shape=list(shape))
    timed = time_rotating(benchmark, XXT_IMPLS[impl], inputs, "cuda")
    C = timed["first_output"]
    assert C.shape == (m, m) and torch.isfinite(C).all()
    median_s = timed["median_s"]
    record_xxt({"shape": f"{m}x{n}", "impl": impl, "median_ms": median_s * 1e3,
                "flops": 2.0 * m * m * n, "tflops": 2.0 * m * m * n / median_s / 1e12,
                "inputs_rotated": len(inputs)})
