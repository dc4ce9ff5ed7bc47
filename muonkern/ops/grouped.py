"""``muonkern::ns5_grouped``: ns5 of a list of matrices of different shapes, one ns5 call per shape.

An optimizer step orthogonalizes many matrices of a few shapes. The list is grouped by (shape in
wide orientation, dtype, device): a tall m×n matrix joins the n×m ones as its transpose, since ns5
iterates in wide orientation (ns5(G) = ns5(Gᵀ)ᵀ, the same arithmetic), and leading batch dims are
flattened. Each group is stacked, orthogonalized by one ``muonkern::ns5`` call (our CUDA or C++
kernel) and split back; every output is its own contiguous tensor of its input's shape and dtype.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .ns5_args import check_ns5_args

NS5_GROUPED_SCHEMA = ("ns5_grouped(Tensor[] Gs, int steps=5, float[]? coefficients=None, "
                      "float eps=1e-07) -> Tensor[]")

GroupKey = Tuple[int, int, torch.dtype, torch.device]


def _check(Gs: Sequence[torch.Tensor], steps: int, coefficients, eps: float) -> None:
    for i, G in enumerate(Gs):
        try:
            check_ns5_args(G, steps, coefficients, eps)
        except (TypeError, ValueError) as e:
            raise type(e)(f"ns5_grouped: Gs[{i}]: {str(e).removeprefix('ns5: ')}") from None


def shape_groups(Gs: Sequence[torch.Tensor]) -> Dict[GroupKey, List[int]]:
    """Indices of ``Gs`` by (rows, cols) in wide orientation, dtype and device, in first-seen order."""
    groups: Dict[GroupKey, List[int]] = {}
    for i, G in enumerate(Gs):
        m, n = G.shape[-2:]
        groups.setdefault((min(m, n), max(m, n), G.dtype, G.device), []).append(i)
    return groups


def ns5_grouped_kernel(Gs: List[torch.Tensor], steps: int = 5,
                       coefficients: Optional[List[float]] = None,
                       eps: float = 1e-7) -> List[torch.Tensor]:
    _check(Gs, steps, coefficients, eps)
    out: List[Optional[torch.Tensor]] = [None] * len(Gs)
    for (rows, cols, _, _), members in shape_groups(Gs).items():
        wide = [Gs[i].mT if Gs[i].shape[-2] > Gs[i].shape[-1] else Gs[i] for i in members]
        flat = [G.reshape(-1, rows, cols) for G in wide]
        result = torch.ops.muonkern.ns5(torch.cat(flat) if len(flat) > 1 else flat[0],
                                        steps, coefficients, eps)
        offset = 0
        for i, G, part in zip(members, wide, flat):
            piece = result[offset:offset + part.shape[0]].reshape(G.shape)
            offset += part.shape[0]
            if Gs[i].shape[-2] > Gs[i].shape[-1]:
                piece = piece.mT
            # a copy unless the group is one tensor: outputs of an op must not share memory
            out[i] = piece.contiguous() if len(members) == 1 else piece.clone(
                memory_format=torch.contiguous_format)
    return out  # type: ignore[return-value]


def ns5_grouped_fake(Gs, steps=5, coefficients=None, eps=1e-7):
    _check(Gs, steps, coefficients, eps)
    return [G.new_empty(G.shape) for G in Gs]
