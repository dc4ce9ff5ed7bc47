"""Test cases and checks of muonkern::ns5 shared by the CPU and CUDA test files (any device)."""
from __future__ import annotations

import re

import pytest
import torch

from muonkern import orthogonality
from reference import GRAM_POLAR_MARGIN, assert_ns5_output, randn, rel_err


def ns5(G, steps=5, coefficients=None, eps=1e-7, algorithm="standard"):
    """The op; the shared cases test the standard iteration (and its CUDA paths) unless told
    otherwise, since "auto" may pick the Gram algorithm for a large shape."""
    return torch.ops.muonkern.ns5(G, steps, coefficients, eps, algorithm)


def shape_id(shape) -> str:
    """Test id of a shape: (2, 3, 40, 24) -> 2x3x40x24 (usable with pytest -k)."""
    return "x".join(map(str, shape))


# Shapes by number of leading batch dims (0, 1, 2, 3), then orientations and edge sizes.
BATCH_DIM_SHAPES = [(24, 80), (3, 24, 80), (2, 3, 24, 80), (2, 1, 3, 24, 80)]
ORIENTATION_SHAPES = [
    (2, 80, 24),     # m > n: the op works on the transpose
    (2, 40, 40),     # square
    (4, 17, 33),     # odd sizes
    (1, 1),          # 1 x 1
    (3, 1, 50),      # row vectors
    (3, 50, 1),      # column vectors
    (2, 3, 5),       # tiny (BF16_RTOL_TINY)
    (2, 5, 3),
]
# Empty batches and zero-size matrices: the op returns an empty tensor of the same shape.
EMPTY_SHAPES = [(0, 4, 5), (3, 0, 5), (2, 4, 0), (0, 0), (2, 0, 0)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def noncontiguous_views(gen: torch.Generator, device) -> dict[str, torch.Tensor]:
    """Inputs whose layout is not the contiguous (..., m, n) one."""
    base9 = randn(gen, *([3] * 9), 8, 12, device=device)
    return {
        "transposed": randn(gen, 2, 40, 24, device=device).mT,           # (2, 24, 40), column-major
        "transposed_tall": randn(gen, 2, 24, 40, device=device).mT,      # (2, 40, 24)
        "step_slices": randn(gen, 3, 50, 90, device=device)[:, ::2, 1::3],  # (3, 25, 30)
        "expanded_batch": randn(gen, 1, 20, 36, device=device).expand(4, 20, 36),  # batch stride 0
        "permuted_batch": randn(gen, 20, 3, 36, device=device).permute(1, 0, 2),   # (3, 20, 36)
        "storage_offset": randn(gen, 3, 20, 36, device=device)[1:],
        # row-major matrices that 16-byte vectors cannot read: a 4-byte offset, an odd batch stride
        "unaligned_start": randn(gen, 2 * 20 * 36 + 1, device=device)[1:].view(2, 20, 36),
        "odd_batch_stride": randn(gen, 3, 20 * 36 + 1, device=device)[:, :20 * 36].unflatten(1, (20, 36)),
        # 9 batch dims whose strides cannot be merged (every dim sliced with a step).
        "nine_batch_dims": base9[(slice(None, None, 2),) * 9],           # (2,)*9 + (8, 12)
    }


def check_noncontiguous(G: torch.Tensor, algorithm: str = "standard") -> None:
    assert not G.is_contiguous() or G.storage_offset() > 0
    out = ns5(G, algorithm=algorithm)
    assert_ns5_output(out, G)
    if G.stride(0) == 0:  # expanded: every copy of the matrix gives the same result
        for i in range(1, G.size(0)):
            assert torch.equal(out[i], out[0])


def _implementation(algorithm: str, run):
    """`run` (an ns5 implementation taking G alone), or the op with this algorithm."""
    return run if run is not None else (lambda G: ns5(G, algorithm=algorithm))


def check_zero_matrices(gen: torch.Generator, device, shape=(3, 8, 24), algorithm: str = "standard",
                        run=None) -> None:
    """Zero matrices give exact zeros (no 0/0), next to a regular matrix in the same batch. `run`
    replaces the op (e.g. one of the Triton implementations)."""
    run = _implementation(algorithm, run)
    G = torch.zeros(shape, device=device)
    G[1] = randn(gen, *shape[1:], device=device)
    out = run(G)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[2] == 0).all()
    assert_ns5_output(out[1:2], G[1:2])
    tall = torch.zeros(2, shape[2], shape[1], device=device)
    assert (run(tall) == 0).all()


def check_nonfinite_isolated(gen: torch.Generator, device, shape=(5, 16, 48), algorithm: str = "standard",
                             run=None) -> None:
    """A matrix holding inf/nan gives a non-finite output; the others in the batch are unaffected."""
    G = randn(gen, *shape, device=device)
    G[1, 3, 4] = float("inf")
    G[2, 0, 0] = float("nan")
    G[3, -1, -1] = float("-inf")
    out = _implementation(algorithm, run)(G)
    for i in (1, 2, 3):
        assert not torch.isfinite(out[i]).all(), f"matrix {i} held a non-finite value but its output is finite"
    for i in (0, 4):
        assert_ns5_output(out[i], G[i])


# (name, input maker(device), kwargs, exception types, message regex). The compiled extension raises
# through TORCH_CHECK_VALUE/TYPE (ValueError/TypeError in Python) and a plain TORCH_CHECK would give
# RuntimeError: each accepts RuntimeError too, with the same message.
_VALUE = (ValueError, RuntimeError)
_TYPE = (TypeError, RuntimeError)
ERROR_CASES = [
    ("rank1", lambda d: torch.randn(5, device=d), {}, _VALUE, re.escape("rank >= 2")),
    ("rank0", lambda d: torch.tensor(1.0, device=d), {}, _VALUE, re.escape("rank >= 2")),
    ("int32", lambda d: torch.ones(3, 3, dtype=torch.int32, device=d), {}, _TYPE, "real floating-point"),
    ("bool", lambda d: torch.ones(3, 3, dtype=torch.bool, device=d), {}, _TYPE, "real floating-point"),
    ("complex64", lambda d: torch.ones(3, 3, dtype=torch.complex64, device=d), {}, _TYPE,
     "real floating-point"),
    ("steps_negative", lambda d: torch.randn(3, 3, device=d), {"steps": -1}, _VALUE, "steps must be >= 0"),
    ("coefficients_short", lambda d: torch.randn(3, 3, device=d), {"coefficients": [1.0, 2.0, 3.0]},
     _VALUE, re.escape("3*steps = 15")),
    ("coefficients_long", lambda d: torch.randn(3, 3, device=d), {"steps": 1, "coefficients": [1.0] * 6},
     _VALUE, re.escape("3*steps = 3")),
    ("coefficients_steps0", lambda d: torch.randn(3, 3, device=d), {"steps": 0, "coefficients": [1.0] * 3},
     _VALUE, re.escape("3*steps = 0")),
    ("eps_zero", lambda d: torch.randn(3, 3, device=d), {"eps": 0.0}, _VALUE, "eps must be positive"),
    ("eps_negative", lambda d: torch.randn(3, 3, device=d), {"eps": -1e-7}, _VALUE, "eps must be positive"),
    ("eps_nan", lambda d: torch.randn(3, 3, device=d), {"eps": float("nan")}, _VALUE, "eps must be positive"),
    ("eps_inf", lambda d: torch.randn(3, 3, device=d), {"eps": float("inf")}, _VALUE,
     re.escape("eps must be positive and finite (it keeps a zero matrix from dividing by zero), got inf")),
    ("coefficients_nan", lambda d: torch.randn(3, 3, device=d), {"steps": 1, "coefficients": [3.4, float("nan"), 2.0]},
     _VALUE, "coefficients must be finite"),
    ("coefficients_inf", lambda d: torch.randn(3, 3, device=d), {"steps": 1, "coefficients": [float("-inf"), 1.0, 2.0]},
     _VALUE, "coefficients must be finite"),
    ("float8", lambda d: torch.ones(3, 3, device=d).to(torch.float8_e5m2), {}, _TYPE,
     re.escape("(float16, bfloat16, float32 or float64), got dtype torch.float8_e5m2")),
    ("algorithm_unknown", lambda d: torch.randn(3, 3, device=d), {"algorithm": "fast"}, _VALUE,
     re.escape("algorithm must be 'auto', 'standard' or 'gram', got 'fast'")),
    ("algorithm_case", lambda d: torch.randn(4, 8, device=d), {"algorithm": "Gram"}, _VALUE,
     re.escape("got 'Gram'")),
    ("algorithm_empty", lambda d: torch.randn(4, 8, device=d), {"algorithm": ""}, _VALUE, re.escape("got ''")),
]
ERROR_IDS = [case[0] for case in ERROR_CASES]


def check_error(case, device) -> None:
    _, make, kwargs, exc, match = case
    with pytest.raises(exc, match=match):
        ns5(make(device), **kwargs)


def ill_conditioned(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """float64 U diag(σ) Vᵀ on the CPU with σ log-spaced from 1 to 1e-4 (random U, V)."""
    return orthogonality.ill_conditioned(shape, gen)


def assert_polar_margin(out: torch.Tensor, ref: torch.Tensor, G: torch.Tensor, what: str = "the reference") -> None:
    """`out` no farther from the exact polar factor of G than `ref` is, per matrix, beyond another
    rounding order's margin (GRAM_POLAR_MARGIN, tests/reference.py)."""
    polar = orthogonality.polar_factor(G.cpu())
    excess = (orthogonality.polar_distance(out.cpu(), polar) - orthogonality.polar_distance(ref.cpu(), polar)).max().item()
    assert excess <= GRAM_POLAR_MARGIN, f"{excess:.4f} farther from the polar factor than {what}"


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Worst per-matrix relative Frobenius difference of two outputs of the same input."""
    return rel_err(a.cpu(), b.cpu()).max().item() if a.numel() else 0.0

