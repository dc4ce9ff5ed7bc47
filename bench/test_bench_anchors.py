"""ns5 against the public anchor implementations, side by side in one process (GPU only).

    python -m pytest -q bench/test_bench_anchors.py

The anchors are read from $MUONKERN_ANCHORS (default <repo>/.scratch/anchors, never committed; its
README.txt names each upstream commit, bench/NOTES.md says how to stage it):
  flash-muon          nil0x9/flash-muon fast_newtonschulz: Triton X·Xᵀ and A·Aᵀ, torch for the rest;
                      2-D only, Jordan's triple (the one it has)
  dion triton         microsoft/dion newton_schulz_triton: Triton X·Xᵀ and c·A·Aᵀ + b·A, addmm/baddbmm;
                      2-D/3-D, You's five fixed triples (it takes none)
  dion triton kernels (Jordan)
                      the same kernels and loop at Jordan's triple (accuracy table only: same cost)
  gram-newton-schulz  Dao-AILab/gram-newton-schulz GramNewtonSchulz at Jordan's triple, restart after
                      step 2; quack's CuTeDSL kernels where installed (short side > 256), else its
                      torch path; the row's label says which, and "standard NS" for square inputs;
                      called as ortho(X), which runs eagerly
  gram-newton-schulz compiled
                      the same through its own torch.compile wrapper (fullgraph, reduce-overhead),
                      which ortho(X) never reaches; per-shape and accuracy rows only
An anchor that is missing or fails to import is skipped with the reason.

Tables: anchors_bench (time per shape, ratio = reference time / this), curvature_bench (the GPT-2-small
step's 72 matrices and flash-muon's X·Xᵀ kernel; ratio = this time / the named reference) and
anchors_accuracy (distance to the exact polar factor), each as .md and .json in $MUONKERN_BENCH_OUT.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from measure import built_table, register_report, shape_str
from reference_ns5 import reference_ns5
from test_bench_ns5 import gpt2_small_matrices, muonkern_label

from muonkern.ops.ns5_args import JORDAN_COEFFICIENTS
from muonkern.orthogonality import polar_distance, polar_factor, singular_value_error

ANCHORS = Path(os.environ.get("MUONKERN_ANCHORS", Path(__file__).resolve().parents[1] / ".scratch" / "anchors"))
SHAPES = [(768, 768), (768, 3072), (1024, 4096), (4096, 4096), (8192, 8192), (2048, 8192),
          (8, 1024, 4096), (48, 128, 128), (12, 64, 768)]
ACCURACY_SHAPES = [(768, 768), (768, 3072), (1024, 4096), (48, 128, 128)]
ANCHOR_IMPLS = ["flash-muon", "dion triton", "gram-newton-schulz", "gram-newton-schulz compiled"]
IMPLS = ["reference", "muonkern", *ANCHOR_IMPLS]
ACCURACY_IMPLS = [*IMPLS, "dion triton kernels (Jordan)"]
GPT2_CASE = "ns5 of a GPT-2-small step's 72 matrices, vs anchors"
XXT_CASE = "X·Xᵀ of one 8192x8192 bf16 matrix"
EPS = 1e-7


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: no CUDA GPU")
# without the anchors this file would only time again what test_bench_ns5.py times
pytestmark = pytest.mark.skipif(not ANCHORS.is_dir(), reason=f"anchors not staged in {ANCHORS} (bench/NOTES.md)")


@dataclass
class Impl:
    fn: Callable[[torch.Tensor], torch.Tensor]
    label: Callable[[tuple | None], str]   # shape -> row label; None: the label of a mixed-shape loop
    max_ndim: int = 3
    module: object = None   # the anchor's package, where a test calls more of it


def _fixed(name: str) -> Callable[[tuple | None], str]:
    return lambda shape: name


def _anchor_module(folder: str, module: str):
    root = ANCHORS / folder
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing (bench/NOTES.md says how to stage the anchors)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(module)


def _reference() -> Impl:
    return Impl(lambda G: reference_ns5(G, 5, EPS), _fixed("reference"))


def _muonkern() -> Impl:
    return Impl(lambda G: torch.ops.muonkern.ns5(G, 5, None, EPS),
                lambda shape: muonkern_label(shape, "cuda") if shape else "muonkern")


def _flash_muon() -> Impl:
    fm = _anchor_module("flash-muon", "flash_muon")
    # Its buffers are sized from X.size(0), so a 3-D input would be wrong, not just slow.
    return Impl(lambda G: fm.fast_newtonschulz(G, 5), _fixed("flash-muon"), max_ndim=2, module=fm)


@functools.cache
def _dion_module():  # one module, so both dion rows share its autotuning
    # By path: dion/__init__.py would import the whole optimizer package and its dependencies.
    path = ANCHORS / "dion" / "dion" / "newton_schulz_triton.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (bench/NOTES.md says how to stage the anchors)")
    spec = importlib.util.spec_from_file_location("dion_newton_schulz_triton", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _dion() -> Impl:
    dion = _dion_module()
    return Impl(dion.newton_schulz_triton, _fixed("dion triton (You coefficients)"))


def _dion_jordan() -> Impl:
    dion = _dion_module()

    @torch.no_grad()
    def run(G):  # newton_schulz_triton's own loop, with Jordan's triple at every step
        tall = G.size(-2) > G.size(-1)
        X = G.to(torch.bfloat16)
        X = X.mT if tall else X
        X = (X / (X.norm(dim=(-2, -1), keepdim=True) + EPS)).contiguous()
        A = torch.empty((*X.shape[:-1], X.size(-2)), device=X.device, dtype=X.dtype)
        B, C = torch.empty_like(A), torch.empty_like(X)
        addmm = torch.baddbmm if X.ndim > 2 else torch.addmm
        a, b, c = JORDAN_COEFFICIENTS
        for _ in range(5):
            dion.ns_line_1(X, out=A)
            dion.ns_line_2(A, alpha=c, beta=b, out=B)
            addmm(X, B, X, beta=a, out=C)
            X, C = C, X
        return X.mT if tall else X
    return Impl(run, _fixed("dion triton kernels (Jordan)"))


def _gram_newton_schulz_impl(compiled: bool) -> Impl:
    gns = _anchor_module("gram-newton-schulz", "gram_newton_schulz")
    kwargs = dict(ns_coefficients=[list(JORDAN_COEFFICIENTS)] * 5, gram_newton_schulz_reset_iterations=[2])
    if not compiled:
        kwargs["compile_kwargs"] = None  # what ortho(X) runs anyway (below), without compiling it
    try:
        ortho, kernels = gns.GramNewtonSchulz(ns_use_kernels=True, **kwargs), True
    except Exception:  # quack / CuTeDSL missing or unusable: the package's own torch path
        ortho, kernels = gns.GramNewtonSchulz(ns_use_kernels=False, **kwargs), False
    min_side = importlib.import_module("gram_newton_schulz.gram_newton_schulz").SYMMETRIC_KERNEL_TILE_SIZE
    name = "gram-newton-schulz compiled" if compiled else "gram-newton-schulz"

    def label(shape):
        if shape is None:
            return f"{name} ({'quack kernels' if kernels else 'torch path'})"
        path = "quack kernels" if kernels and min(shape[-2:]) > min_side else "torch path"
        return f"{name} ({path}, {'standard NS' if shape[-2] == shape[-1] else 'gram NS'})"
    # ortho(X), as its README and Muon call it, runs eagerly: __init__ stores its torch.compile
    # wrapper (fullgraph, mode="reduce-overhead") as an instance attribute, and a call looks __call__
    # up on the class. The compiled row calls that wrapper itself. Both normalize an fp32 X in place.
    return Impl(ortho.__dict__["__call__"] if compiled else (lambda G: ortho(G)), label)


LOADERS = {"reference": _reference, "muonkern": _muonkern, "flash-muon": _flash_muon, "dion triton": _dion,
           "dion triton kernels (Jordan)": _dion_jordan,
           "gram-newton-schulz": functools.partial(_gram_newton_schulz_impl, compiled=False),
           "gram-newton-schulz compiled": functools.partial(_gram_newton_schulz_impl, compiled=True)}


@functools.cache
def _load(name: str) -> Impl | str:
    try:
        return LOADERS[name]()
    except Exception as e:  # third-party code: any failure to import or set up is a skip, with its cause
        return f"{name} unavailable: {type(e).__name__}: {e}"


def get_impl(name: str) -> Impl:
    impl = _load(name)
    if isinstance(impl, str):
        pytest.skip(impl)
    return impl


def _ndim_skip(impl: Impl, name: str, shape) -> None:
    if len(shape) > impl.max_ndim:
        pytest.skip(f"{name} takes {impl.max_ndim}-D matrices only")


# ---- time per shape -------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_str)
def test_ns5_vs_anchors(time_ns5, shape, impl):
    anchor = get_impl(impl)
    _ndim_skip(anchor, impl, shape)
    time_ns5(anchor.fn, shape, anchor.label(shape), "cuda")


# ---- the matrices of one optimizer step ----------------------------------------------------------

@needs_cuda
# gram-newton-schulz's compiled wrapper is left out: it would compile a graph per shape of the step
@pytest.mark.parametrize("impl", ["reference", "muonkern.ns5_grouped",
                                  *(name for name in ANCHOR_IMPLS if name != "gram-newton-schulz compiled")])
def test_gpt2_small_step_vs_anchors(time_probe, impl):
    Gs = gpt2_small_matrices("cuda")
    if impl == "muonkern.ns5_grouped":
        fn, label = (lambda: torch.ops.muonkern.ns5_grouped(Gs, 5, None, EPS)), impl
    else:
        anchor = get_impl(impl)
        fn, label = (lambda: [anchor.fn(G) for G in Gs]), f"loop of {anchor.label(None)}"
    time_probe(fn, GPT2_CASE, label, reference=None if impl == "reference" else "loop of reference")


# ---- flash-muon's X·Xᵀ kernel (its README: 1.56x over torch at 8192² bf16 on an H800) -------------

@needs_cuda
@pytest.mark.parametrize("impl", ["torch X @ X.mT", "flash-muon matmul_transpose"])
def test_flash_muon_xxt(time_probe, impl):
    X = torch.randn(8192, 8192, generator=torch.Generator().manual_seed(0)).to("cuda", torch.bfloat16)
    if impl == "torch X @ X.mT":
        time_probe(lambda: X @ X.mT, XXT_CASE, impl)
        return
    matmul_transpose = get_impl("flash-muon").module.matmul_transpose
    expected = (X @ X.mT).float()
    err = torch.linalg.norm(matmul_transpose(X).float() - expected) / torch.linalg.norm(expected)
    assert err < 1e-2, f"flash-muon matmul_transpose is off by {err:.2e} (relative Frobenius)"
    time_probe(lambda: matmul_transpose(X), XXT_CASE, impl, reference="torch X @ X.mT")


# ---- accuracy: distance to the exact polar factor ------------------------------------------------

_ACCURACY: dict[str, list[dict]] = {}  # impl -> one row per ACCURACY_SHAPES entry


@functools.cache
def _polar_case(shape):
    """A Gaussian fp32 input (the same for every impl) and its exact polar factor U Vᵀ (float64 SVD)."""
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0)).cuda()
    return G, polar_factor(G)


def accuracy_row(impl: Impl, name: str, shape, G: torch.Tensor, polar: torch.Tensor) -> dict:
    """The table's cells for one impl and shape: shape, impl, distance, max |σ−1|."""
    row = {"shape": shape_str(shape), "impl": impl.label(shape)}
    if len(shape) > impl.max_ndim:
        return {**row, "distance": "—", "max_sigma_error": f"— ({impl.max_ndim}-D only)"}
    X = impl.fn(G.clone()).double()  # a clone: gram-newton-schulz normalizes an fp32 input in place
    assert X.shape == G.shape, f"{name} returned shape {tuple(X.shape)} for {shape_str(shape)}"
    # one distance over the whole batch (the batch as one tall matrix), as the README's table has it
    dist = polar_distance(X.reshape(-1, X.shape[-1]), polar.reshape(-1, polar.shape[-1])).item()
    sigma_dev = singular_value_error(X).max().item()
    assert math.isfinite(dist), f"{name} returned non-finite values on {shape_str(shape)}"
    return {**row, "distance": f"{dist:.4f}", "max_sigma_error": f"{sigma_dev:.3f}"}


def _accuracy_rows() -> list[dict]:
    """The rows measured so far, by shape, then in ACCURACY_IMPLS order."""
    return [_ACCURACY[name][i] for i in range(len(ACCURACY_SHAPES)) for name in ACCURACY_IMPLS if name in _ACCURACY]


def _accuracy_report(rows: list[dict], env: dict) -> str:
    lines = ["# ns5 accuracy: muonkern and the anchors", "", f"torch {env['torch']}, {env.get('gpu', 'cpu')}", "",
             "Gaussian fp32 input (seed 0), 5 steps; distance = ‖X − UVᵀ‖_F / ‖UVᵀ‖_F over the whole "
             "tensor, UVᵀ from a float64 SVD of the same input; max |σ−1| over every matrix of X.", "",
             "| shape (fp32) | impl | ‖X−UVᵀ‖/‖UVᵀ‖ | max \\|σ−1\\| |", "|---|---|---:|---:|"]
    lines += [f"| {r['shape']} | {r['impl']} | {r['distance']} | {r['max_sigma_error']} |" for r in rows]
    return "\n".join(lines) + "\n"


@needs_cuda
@pytest.mark.parametrize("impl", ACCURACY_IMPLS)
def test_accuracy_vs_polar(impl):
    # anchors_accuracy.md/.json, rewritten after every impl like every table (bench/conftest.py)
    register_report("anchors_accuracy", lambda: built_table(_accuracy_rows(), _accuracy_report))
    anchor = get_impl(impl)
    _ACCURACY[impl] = [accuracy_row(anchor, impl, shape, *_polar_case(shape)) for shape in ACCURACY_SHAPES]
