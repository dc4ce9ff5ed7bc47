"""ns5 benchmarks: muonkern vs the reference implementations, side by side in one process.

GPU (the baseline shapes, fp32 inputs):
  muonkern            torch.ops.muonkern.ns5 (our kernels; path chosen by the op, see MUONKERN_NS5_PATH),
                      algorithm="auto" (the default); labelled "muonkern (auto: gram)" where auto runs
                      the Gram iteration
  muonkern standard   algorithm="standard" and algorithm="gram" side by side, on the Gram shapes only
  muonkern gram       (GRAM_SHAPES; TFLOP/s of every row count the standard iteration's FLOPs)
  reference           muonkern.ops.fallback.ns5_reference, eager: KellerJordan/Muon's algorithm
  reference_compiled  torch.compile of the reference (default mode, one static graph per shape)
  torch_optim_muon    torch.optim.Muon's internal _zeropower_via_newtonschulz (2-D only)
CPU (runs when no GPU is present, or with MUONKERN_BENCH_CPU=1): muonkern (and its algorithms on
CPU_GRAM_SHAPES) vs reference.

    python -m pytest bench -q
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from muonkern.ops.fallback import ns5_reference
from muonkern.ops.ns5_args import JORDAN_COEFFICIENTS, choose_algorithm

# Wide (1:4) and tall shapes where "auto" may pick the Gram iteration: timed with each algorithm.
GRAM_SHAPES = [(1024, 4096), (2048, 8192), (8, 1024, 4096), (4096, 1024)]
CPU_GRAM_SHAPES = [(512, 2048)]
GPU_SHAPES = [(768, 768), (768, 3072), (1024, 4096), (4096, 4096), (8192, 8192),
              (48, 128, 128), (12, 64, 768), (8, 1024, 4096), (2048, 8192), (4096, 1024)]
CPU_SHAPES = [(4, 64, 256), (256, 256), *CPU_GRAM_SHAPES]
GPU_IMPLS = ["reference", "muonkern", "muonkern standard", "muonkern gram", "reference_compiled",
             "torch_optim_muon"]
CPU_IMPLS = ["reference", "muonkern", "muonkern standard", "muonkern gram"]
ALGORITHM_IMPLS = {"muonkern standard": "standard", "muonkern gram": "gram"}

_compiled_reference = None


def _muonkern(G):
    return torch.ops.muonkern.ns5(G, 5, None, 1e-7)


def _reference(G):
    return ns5_reference(G, 5, None, 1e-7, "standard")


def _reference_compiled(G):
    global _compiled_reference
    if _compiled_reference is None:
        # One static graph per shape (dynamic=False), as modded-nanogpt compiles it; room for all shapes.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        _compiled_reference = torch.compile(ns5_reference, dynamic=False)
    return _compiled_reference(G, 5, None, 1e-7, "standard")


def _torch_optim_muon(G):
    from torch.optim._muon import _zeropower_via_newtonschulz
    return _zeropower_via_newtonschulz(G, ns_coefficients=JORDAN_COEFFICIENTS, ns_steps=5, eps=1e-7)


IMPLS = {"muonkern": _muonkern, "reference": _reference, "reference_compiled": _reference_compiled,
         "torch_optim_muon": _torch_optim_muon,
         **{impl: (lambda G, a=algorithm: torch.ops.muonkern.ns5(G, 5, None, 1e-7, a))
            for impl, algorithm in ALGORITHM_IMPLS.items()}}


def _time_impl(time_ns5, shape, impl: str, device: str, gram_shapes) -> None:
    """Times one impl; the algorithm rows only on the Gram shapes, and the default call labelled with
    the algorithm "auto" picks where it is the Gram one."""
    if impl in ALGORITHM_IMPLS and tuple(shape) not in gram_shapes:
        pytest.skip("algorithm rows are timed on the Gram shapes only")
    label = impl
    if impl == "muonkern" and choose_algorithm(shape[-2], shape[-1], 5, math.prod(shape[:-2]), device) == "gram":
        label = "muonkern (auto: gram)"
    time_ns5(IMPLS[impl], shape, label, device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: no CUDA GPU")
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ns5_cuda(time_ns5, shape, impl):
    if impl == "torch_optim_muon":
        try:
            from torch.optim._muon import _zeropower_via_newtonschulz  # noqa: F401
        except ImportError:
            pytest.skip("this torch has no torch.optim._muon")
        if len(shape) != 2:
            pytest.skip("torch.optim.Muon's Newton-Schulz takes 2-D matrices only")
    _time_impl(time_ns5, shape, impl, "cuda", GRAM_SHAPES)


@pytest.mark.skipif(torch.cuda.is_available() and os.environ.get("MUONKERN_BENCH_CPU") != "1",
                    reason="CPU benchmark runs without a GPU, or with MUONKERN_BENCH_CPU=1")
@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
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
