"""``muonkern::ns5_grouped``: ns5 of a list of matrices of different shapes, one ns5 call per shape.

An optimizer step orthogonalizes many matrices of a few shapes. The list is grouped by (shape in
wide orientation, dtype, device): a tall m×n matrix joins the n×m ones as its transpose, since the
standard iteration works in wide orientation (ns5(G) = ns5(Gᵀ)ᵀ, the same arithmetic), and leading
batch dims are flattened. Where the Gram algorithm runs (algorithm="gram", or "auto" choosing it for
the tensor: muonkern.ops.ns5_route), tall matrices keep their own group: ns5 multiplies them from the right, which rounds
differently from the transpose. Each group is stacked, orthogonalized by one ``muonkern::ns5`` call
(our CUDA or C++ kernel) and split back; every output is its own contiguous tensor of its input's
shape and dtype.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .ns5_args import check_ns5_args, check_ns5_tensor
from .ns5_routing import checked_route

NS5_GROUPED_SCHEMA = ('ns5_grouped(Tensor[] Gs, int steps=5, float[]? coefficients=None, '
                      'float eps=1e-07, str algorithm="auto") -> Tensor[]')

# (short side, long side, dtype, device, algorithm, tall): tall only under "gram"
GroupKey = Tuple[int, int, torch.dtype, torch.device, str, bool]


def _check(Gs: Sequence[torch.Tensor], steps: int, coefficients, eps: float, algorithm: str) -> None:
    """The op's checks, naming the tensor; the options once, with the first tensor (per-step work)."""
    for i, G in enumerate(Gs):
        try:
            check_ns5_args(G, steps, coefficients, eps, algorithm) if i == 0 else check_ns5_tensor(G)
        except (TypeError, ValueError) as e:
            raise type(e)(f"ns5_grouped: Gs[{i}]: {str(e).removeprefix('ns5: ')}") from None


def shape_groups(Gs: Sequence[torch.Tensor], steps: int = 5,
                 algorithm: str = "auto") -> Dict[GroupKey, List[int]]:
    """Indices of ``Gs`` by (rows, cols) in wide orientation, dtype, device and the algorithm ns5
    runs for them ("standard" or "gram"; gram keeps tall matrices apart), in first-seen order."""
    groups: Dict[GroupKey, List[int]] = {}
    chosen_for: Dict[Tuple[torch.Size, torch.device], str] = {}  # one route query per shape and device
    for i, G in enumerate(Gs):
        m, n = G.shape[-2:]
        # "auto" decides per tensor, as ns5(G) alone would (on CUDA the kernel's route, which may
        # take the Gram iteration on the fused kernel): each output equals ns5 of its input
        key = (G.shape, G.device)
        if algorithm == "auto" and key not in chosen_for:
            chosen_for[key] = checked_route(G, steps, "auto").algorithm
        chosen = chosen_for[key] if algorithm == "auto" else algorithm
        tall = chosen == "gram" and m > n
        groups.setdefault((min(m, n), max(m, n), G.dtype, G.device, chosen, tall), []).append(i)
    return groups


def ns5_grouped_kernel(Gs: List[torch.Tensor], steps: int = 5,
                       coefficients: Optional[List[float]] = None,
                       eps: float = 1e-7, algorithm: str = "auto") -> List[torch.Tensor]:
    _check(Gs, steps, coefficients, eps, algorithm)
    out: List[Optional[torch.Tensor]] = [None] * len(Gs)
    for (short, long, _, _, chosen, tall), members in shape_groups(Gs, steps, algorithm).items():
        rows, cols = (long, short) if tall else (short, long)
        flip = [Gs[i].shape[-2] != rows for i in members]  # tall matrices of a wide group
        oriented = [Gs[i].mT if f else Gs[i] for i, f in zip(members, flip)]
        # the matrix count spelled out: -1 is ambiguous for a zero-sized side
        flat = [G.reshape(math.prod(G.shape[:-2]), rows, cols) for G in oriented]
        result = torch.ops.muonkern.ns5(torch.cat(flat) if len(flat) > 1 else flat[0],
                                        steps, coefficients, eps, chosen)
        offset = 0
        for i, G, part, f in zip(members, oriented, flat, flip):
            piece = result[offset:offset + part.shape[0]].reshape(G.shape)
            offset += part.shape[0]
            if f:
                piece = piece.mT
            # a copy unless the group is one tensor: outputs of an op must not share memory
            out[i] = piece.contiguous() if len(members) == 1 else piece.clone(
                memory_format=torch.contiguous_format)
    return out  # type: ignore[return-value]


def ns5_grouped_fake(Gs, steps=5, coefficients=None, eps=1e-7, algorithm="auto"):
    _check(Gs, steps, coefficients, eps, algorithm)
    return [G.new_empty(G.shape) for G in Gs]
