"""Bounds of a symmetric product (X Xᵀ, or a·I + b·A + c·A·A) from a Triton kernel against float64, shared
by the tests of muonkern.ops.triton_symmetric and muonkern.ops.triton_gram."""
from __future__ import annotations

import torch

# ---- bounds of a symmetric product against float64 -------------------------------------------
# The operands are bf16 values, held exactly in float64 for the reference, so only the kernel's own
# arithmetic differs: products of two bf16 numbers are exact in fp32, the K-long fp32 sum is off by
# at most about K·2^-24·Σ|x_ik x_jk| <= K·2^-24·‖x_i‖‖x_j‖ (4x slack below for the tensor cores'
# accumulation order), and the one rounding of the result to bf16 adds at most 2^-8 relative per
# element. In Frobenius norm the rounding is about 2^-8/√3 ≈ 2.3e-3 (uniform), at most 2^-8 ≈ 3.9e-3;
# the budget 1e-2 leaves 2.5x over the worst case. A wrong, missing or misplaced tile is off by
# O(1) relative and fails both checks.
BF16_OUT_RTOL = 2.0 ** -8
FROBENIUS_RTOL = 1e-2
ACC_SLACK = 4.0 * 2.0 ** -24


def assert_symmetric_product(C: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor, K: int,
                             out_rtol: float = BF16_OUT_RTOL, terms: torch.Tensor | None = None,
                             cols: torch.Tensor | None = None) -> None:
    """C (…, m, m) from the kernel against the float64 ``ref``; for C = A·B, ``rows`` (…, m, K) are
    A's rows and ``cols`` (…, m, K) B's columns (default: ``rows``, as for X Xᵀ), whose norms bound
    the accumulation error; ``terms`` (…, m, m), if given, the magnitudes an fp32 epilogue adds up
    (one fp32 rounding each, 2^-23 with slack)."""
    C = C.double().cpu()
    ref = ref.double().cpu()
    assert not torch.isnan(C).any(), "NaN left in the output: a tile was not written"
    assert torch.equal(C, C.mT), "the output is not exactly symmetric"
    row_norms = torch.linalg.vector_norm(rows.double().cpu(), dim=-1)
    col_norms = row_norms if cols is None else torch.linalg.vector_norm(cols.double().cpu(), dim=-1)
    bound = out_rtol * ref.abs() + K * ACC_SLACK * row_norms[..., :, None] * col_norms[..., None, :] + 1e-30
    if terms is not None:
        bound = bound + 2.0 ** -23 * terms.double().cpu()
    excess = ((C - ref).abs() / bound).max().item()
    assert excess <= 1.0, f"an element is {excess:.3g}x beyond its bound"
    frob = (torch.linalg.vector_norm(C - ref, dim=(-2, -1)) / torch.linalg.vector_norm(ref, dim=(-2, -1)))
    assert frob.max().item() <= FROBENIUS_RTOL, f"relative Frobenius error {frob.max().item():.3g}"


def poisoned(shape, dtype=torch.bfloat16, device="cuda") -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
