"""Registers ``torch.ops.muonkern.taylor_attention`` (schema, kernels, fake kernel).

The ``muonkern`` namespace belongs to :mod:`muonkern.ops` (the compiled extension or its
fallback); this module adds one op to it as a library fragment:

* CompositeExplicitAutograd (every device): :func:`taylor_attention_blocked`;
* CUDA: the Triton kernels where they apply (head dim 64 in float32/bfloat16, 128 in
  bfloat16), else the blocked fallback. A case a GPU cannot fit (Triton's OutOfResources:
  shared memory or registers) falls back too, with one warning per (head dim, dtype, GPU).
  ``MUONKERN_TAYLOR_ATTENTION=fallback`` forces the fallback on CUDA (read at every call);
* a fake kernel (shapes and dtypes only) for FakeTensor and ``torch.compile``.
"""
from __future__ import annotations

import warnings

import torch

from .attention import check_taylor_attention_args, taylor_attention_blocked, triton_requested

SCHEMA = ("taylor_attention(Tensor q, Tensor k, Tensor v, Tensor qd, Tensor kd, Tensor vd, "
          "Tensor qdd, Tensor kdd, Tensor vdd, float? scale=None) -> (Tensor, Tensor, Tensor)")
QUALNAME = "muonkern::taylor_attention"

# (head dim, dtype) served by the Triton kernels; float32 at 128 does not fit an H100's shared
# memory (see muonkern.taylor.triton_attention)
TRITON_CASES = ((64, torch.float32), (64, torch.bfloat16), (128, torch.bfloat16))

_library = None  # keeps the registrations alive
_TRITON_DOES_NOT_FIT = set()  # (head dim, dtype, device) where the kernels ran out of resources


def triton_applies(q: torch.Tensor) -> bool:
    """Whether the CUDA kernel of the op runs the Triton kernel for inputs like ``q``."""
    if not triton_requested(q, "MUONKERN_TAYLOR_ATTENTION", ("auto", "triton", "fallback"),
                            off="fallback"):
        return False
    return ((q.shape[-1], q.dtype) in TRITON_CASES
            and (q.shape[-1], q.dtype, q.device) not in _TRITON_DOES_NOT_FIT)


def _fallback_kernel(q, k, v, qd, kd, vd, qdd, kdd, vdd, scale=None):
    return taylor_attention_blocked(q, k, v, qd, kd, vd, qdd, kdd, vdd, scale)


def _cuda_kernel(q, k, v, qd, kd, vd, qdd, kdd, vdd, scale=None):
    check_taylor_attention_args(q, k, v, qd, kd, vd, qdd, kdd, vdd, scale)
    if triton_applies(q):
        from triton.runtime.errors import OutOfResources

        from .triton_attention import taylor_attention_triton
        try:
            return taylor_attention_triton(q, k, v, qd, kd, vd, qdd, kdd, vdd, scale)
        except OutOfResources as e:
            _TRITON_DOES_NOT_FIT.add((q.shape[-1], q.dtype, q.device))
            warnings.warn(f"muonkern::taylor_attention: the Triton kernels do not fit this GPU for "
                          f"head dim {q.shape[-1]} in {q.dtype} ({e}); using the PyTorch fallback",
                          RuntimeWarning, stacklevel=2)
    return taylor_attention_blocked(q, k, v, qd, kd, vd, qdd, kdd, vdd, scale)


def _fake_kernel(q, k, v, qd, kd, vd, qdd, kdd, vdd, scale=None):
    check_taylor_attention_args(q, k, v, qd, kd, vd, qdd, kdd, vdd, scale)
    return q.new_empty(q.shape), qd.new_empty(qd.shape), qdd.new_empty(qdd.shape)


def register() -> None:
    """Defines and implements the op once (idempotent)."""
    global _library
    if _library is not None:
        return
    import muonkern.ops  # noqa: F401  (the namespace's owner registers first)

    lib = torch.library.Library("muonkern", "FRAGMENT")
    lib.define(SCHEMA)
    lib.impl("taylor_attention", _fallback_kernel, "CompositeExplicitAutograd")
    lib.impl("taylor_attention", _cuda_kernel, "CUDA")
    torch.library.register_fake(QUALNAME, _fake_kernel, lib=lib)
    _library = lib
