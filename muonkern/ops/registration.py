"""Makes every muonkern op callable: the compiled extension when present, the fallback otherwise.

Order matters: the extension (if loaded) defines the schemas and its CPU/CUDA kernels in C++;
otherwise the schemas are defined here with the pure-PyTorch fallback as their kernel. Fake
kernels are registered in both cases so torch.compile and FakeTensor see through the ops.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch
import torch.autograd.forward_ad as forward_ad
import torch.utils._pytree as pytree

from . import fallback
from .dirquad_args import dirquad_sizes
from .grouped import NS5_GROUPED_SCHEMA, ns5_grouped_fake, ns5_grouped_kernel
from .ns5_args import check_ns5_args
from .schemas import SCHEMAS

_FALLBACK_KERNELS = {"ns5": fallback.ns5_reference, "dirquad": fallback.dirquad_reference}
_library = None  # keeps the torch.library registrations alive
_backend = None


def _load_extension() -> bool:
    if os.environ.get("MUONKERN_FORCE_FALLBACK", "") not in ("", "0"):
        return False
    try:
        importlib.import_module("muonkern._C")
    except ImportError:
        return False
    return True


def _ns5_fake(G, steps=5, coefficients=None, eps=1e-7, algorithm="auto"):
    check_ns5_args(G, steps, coefficients, eps, algorithm)
    return G.new_empty(G.shape)


def _dirquad_fake(grads, directions, products):
    K, R, P = dirquad_sizes(grads, directions, products)
    return grads[0].new_empty((K, 2 + R, P), dtype=torch.float64)


_FAKE_KERNELS = {"ns5": _ns5_fake, "dirquad": _dirquad_fake}


class _NotDifferentiable(torch.autograd.Function):
    """Runs an op below autograd; its outputs take a backward that raises. The compiled extension
    registers PyTorch's C++ equivalent for every muonkern op (csrc/ops.cpp); this serves a build
    without it, where PyTorch's own fallback would let backward run through the fallback's torch ops
    with a warning. `tracked` are the call's tensors that require grad (inside lists too), passed
    apart so that autograd links the outputs to them."""

    @staticmethod
    def forward(ctx, name, op, args, kwargs, *tracked):
        ctx.name = name
        out = op(*args, **kwargs)   # grad mode is off in here: the Autograd kernel below passes straight through
        return tuple(out) if isinstance(out, (list, tuple)) else out

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"derivative for muonkern::{ctx.name} is not implemented")


def _not_differentiable(name: str):
    """The Autograd kernel of a Python-defined muonkern op (see _NotDifferentiable)."""
    op = getattr(torch.ops.muonkern, name).default

    def kernel(*args, **kwargs):
        # inputs that require grad (in grad mode), or carry a forward-mode tangent (in a dual level,
        # grad mode or not; it then raises: no jvp), as the extension's C++ kernel tracks them;
        # neither mode on (an optimizer's calls): no scan
        grad, dual = torch.is_grad_enabled(), forward_ad._current_level >= 0
        tracked = (grad or dual) and [
            t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
            and ((grad and t.requires_grad) or (dual and forward_ad.unpack_dual(t).tangent is not None))]
        if not tracked:
            with torch._C._AutoDispatchBelowAutograd():
                return op(*args, **kwargs)
        out = _NotDifferentiable.apply(name, op, args, kwargs, *tracked)
        return list(out) if isinstance(out, tuple) else out

    return kernel


def _register_not_differentiable(library, names) -> None:
    for name in names:
        library.impl(name, _not_differentiable(name), "Autograd")


def register() -> str:
    """Registers the ops once; returns the backend name (see muonkern.backend)."""
    global _library, _backend
    if _backend is not None:
        return _backend
    if _load_extension():
        _library = torch.library.Library("muonkern", "IMPL")
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("muonkern::ns5", "CUDA")
        if not has_cuda:
            # A CPU-only build of the extension still serves CUDA tensors through the fallback.
            for name, kernel in _FALLBACK_KERNELS.items():
                _library.impl(name, kernel, "CUDA")
        _backend = "cuda" if has_cuda else "cpu"
    else:
        _library = torch.library.Library("muonkern", "DEF")
        for name, schema in SCHEMAS.items():
            _library.define(schema)
            _library.impl(name, _FALLBACK_KERNELS[name], "CompositeExplicitAutograd")
        _register_not_differentiable(_library, SCHEMAS)
        _backend = "fallback"
    for name, fake in _FAKE_KERNELS.items():
        torch.library.register_fake(f"muonkern::{name}", fake, lib=_library)
    _register_composites()
    return _backend


_composites = None

# Triton routes of ns5, defined where triton is installed; the CUDA kernel of ns5 hands calls to them
# (csrc/ns5_cuda.cpp, triton_route):
#   ns5_symmetric       X Xᵀ and a·I + b·A + c·A·A on one triangle of tiles (muonkern.ops.triton_symmetric):
#                       large matrices on Hopper, and MUONKERN_NS5_PATH=symmetric
#   ns5_gram_symmetric  the Gram iteration with every symmetric product on the stream-K kernel
#                       (muonkern.ops.triton_gram): MUONKERN_NS5_PATH=symmetric for Gram calls
#   ns5_small           one program per matrix, short side <= 128 (muonkern.ops.triton_small):
#                       MUONKERN_NS5_PATH=small
NS5_ROUTE_ARGS = "(Tensor G, int steps=5, float[]? coefficients=None, float eps=1e-07) -> Tensor"


def _ns5_symmetric_kernel(G, steps=5, coefficients=None, eps=1e-7):
    from .triton_symmetric import ns5_symmetric   # imports triton: on first use, not at import
    if G.dim() <= 3:                               # ns5_symmetric checks the arguments
        return ns5_symmetric(G, steps, coefficients, eps)
    return ns5_symmetric(G.reshape(-1, *G.shape[-2:]), steps, coefficients, eps).reshape(G.shape)


def _ns5_gram_symmetric_kernel(G, steps=5, coefficients=None, eps=1e-7):
    from .triton_gram import ns5_gram_symmetric   # any batch dims; checks the arguments
    return ns5_gram_symmetric(G, steps, coefficients, eps)


def _ns5_small_kernel(G, steps=5, coefficients=None, eps=1e-7):
    from .triton_small import ns5_small   # any batch dims; checks the arguments
    return ns5_small(G, steps, coefficients, eps)


def _register_composites() -> None:
    """Ops written in terms of the others or in Triton (Python on every backend): ns5_grouped,
    and the Triton routes (ns5_symmetric, ns5_gram_symmetric, ns5_small) where triton is installed."""
    global _composites
    _composites = torch.library.Library("muonkern", "FRAGMENT")
    _composites.define(NS5_GROUPED_SCHEMA)
    _composites.impl("ns5_grouped", ns5_grouped_kernel, "CompositeExplicitAutograd")
    python_defined = ["ns5_grouped"]
    torch.library.register_fake("muonkern::ns5_grouped", ns5_grouped_fake, lib=_composites)
    if importlib.util.find_spec("triton") is not None:
        for name, kernel in (("ns5_symmetric", _ns5_symmetric_kernel),
                             ("ns5_gram_symmetric", _ns5_gram_symmetric_kernel),
                             ("ns5_small", _ns5_small_kernel)):
            _composites.define(name + NS5_ROUTE_ARGS)
            for key in ("CUDA", "CPU"):   # CPU tensors: Triton's interpreter, or its clear error
                _composites.impl(name, kernel, key)
            torch.library.register_fake(f"muonkern::{name}", _ns5_fake, lib=_composites)
            python_defined.append(name)
    if _backend == "fallback":   # the extension registers these in C++ (csrc/ops.cpp)
        _register_not_differentiable(_composites, python_defined)
