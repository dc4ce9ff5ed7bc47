"""Which path and algorithm a muonkern::ns5 call runs.

On CUDA tensors served by the compiled CUDA kernels, the kernel's own choice (csrc/ns5_cuda.cpp,
choose_route): the fused one-launch kernel, the cuBLASLt path or a Triton op, and the algorithm
"auto" resolves to there (on the fused kernel it may take the Gram iteration below
choose_algorithm's short side). Elsewhere the C++ CPU kernel or the fallback, with choose_algorithm's
rule.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .ns5_args import check_ns5_args, resolve_algorithm


class Ns5Route(NamedTuple):
    path: str        # "fused", "general", a Triton op ("muonkern::ns5_symmetric", ...), "cpu" or "fallback"
    algorithm: str   # "standard" or "gram"
    cluster: int     # blocks per matrix on the fused path, 0 elsewhere


def ns5_route(G: torch.Tensor, steps: int = 5, algorithm: str = "auto") -> Ns5Route:
    """The route of ``ns5(G, steps, algorithm=algorithm)`` (under the current MUONKERN_NS5_*
    environment); G's values are not read."""
    check_ns5_args(G, steps, None, 1e-7, algorithm)
    return checked_route(G, steps, algorithm)


def checked_route(G: torch.Tensor, steps: int, algorithm: str) -> Ns5Route:
    """ns5_route for arguments the caller has checked (ns5_grouped's, the optimizer's own batches)."""
    from .registration import register  # here, not at import: registration imports this module
    backend = register()
    m, n = G.shape[-2:]
    if G.is_cuda and backend == "cuda":
        from muonkern import _C
        batch = G.numel() // (m * n) if m * n > 0 else 0
        with torch.cuda.device(G.device):
            return Ns5Route(*_C.ns5_cuda_route(batch, m, n, steps, algorithm))
    compiled_cpu = backend != "fallback" and G.device.type == "cpu"
    return Ns5Route("cpu" if compiled_cpu else "fallback", resolve_algorithm(algorithm, G, steps), 0)
