"""Argument checks shared by the curvature functions: params, directions, losses, groups."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..checks import check_int_at_least, check_positive_int

Params = Mapping[str, torch.Tensor]


def check_params(params: Params) -> Dict[str, torch.Tensor]:
    """Return a detached, ordered copy of ``params`` after checking names, types and devices."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict name -> tensor, got {type(params).__name__}")
    if len(params) == 0:
        raise ValueError("params is empty")
    out: Dict[str, torch.Tensor] = {}
    device = None
    for name, t in params.items():
        if not isinstance(name, str):
            raise TypeError(f"parameter names must be str, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"params[{name!r}] is a {type(t).__name__}, not a tensor")
        if not t.is_floating_point():
            raise TypeError(
                f"params[{name!r}] has dtype {t.dtype}; curvature needs real floating-point "
                "parameters")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(
                f"all parameters must be on one device; params[{name!r}] is on {t.device}, "
                f"others on {device}")
        out[name] = t.detach()
    check_finite(out, "params")
    return out


def check_finite(tensors: Dict[str, torch.Tensor], what: str) -> None:
    """ValueError naming the first tensor with a NaN or infinity (one device sync for all)."""
    _check_finite_labeled([(f"{what}[{name!r}]", t) for name, t in tensors.items()])


def _check_finite_labeled(labeled: List[Tuple[str, torch.Tensor]]) -> None:
    finite = torch.stack([torch.isfinite(t).all() for _, t in labeled])
    if not bool(finite.all()):
        label = labeled[int((~finite).nonzero()[0])][0]
        raise ValueError(f"{label} has non-finite values (NaN or infinity)")


def check_like(params: Dict[str, torch.Tensor], v: Params, what: str) -> Dict[str, torch.Tensor]:
    """Check that ``v`` has exactly the keys and shapes of ``params`` and finite values; return it
    in params order, in each parameter's dtype and device."""
    out = _like(params, v, what)
    check_finite(out, what)
    return out


def _like(params: Dict[str, torch.Tensor], v: Params, what: str) -> Dict[str, torch.Tensor]:
    """check_like without the finiteness check."""
    if not isinstance(v, Mapping):
        raise TypeError(f"{what} must be a dict name -> tensor, got {type(v).__name__}")
    missing = [k for k in params if k not in v]
    extra = [k for k in v if k not in params]
    if missing or extra:
        raise ValueError(
            f"{what} keys must match params keys: missing {missing}, unexpected {extra}")
    out = {}
    for name, p in params.items():
        t = v[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{name!r}] is a {type(t).__name__}, not a tensor")
        if t.shape != p.shape:
            raise ValueError(
                f"{what}[{name!r}] has shape {tuple(t.shape)}, params[{name!r}] has "
                f"{tuple(p.shape)}")
        if t.is_complex():
            raise TypeError(f"{what}[{name!r}] is complex; only real directions are supported")
        out[name] = t.detach().to(dtype=p.dtype, device=p.device)
    return out


def check_scalar(loss: torch.Tensor) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn(params) must return a scalar tensor")
    return loss.reshape(())


def direction_list(params: Dict[str, torch.Tensor], directions
                   ) -> Tuple[List[Dict[str, torch.Tensor]], bool]:
    """(checked list of directions, whether a single dict was given)."""
    if isinstance(directions, Mapping):
        return [check_like(params, directions, "direction")], True
    if isinstance(directions, (list, tuple)):
        if len(directions) == 0:
            raise ValueError("directions is an empty list")
        checked = [_like(params, d, f"directions[{i}]") for i, d in enumerate(directions)]
        # one device sync for all the directions' finiteness
        _check_finite_labeled([(f"directions[{i}][{name!r}]", t)
                               for i, d in enumerate(checked) for name, t in d.items()])
        return checked, False
    raise TypeError("directions must be a dict name -> tensor or a list of such dicts, "
                    f"got {type(directions).__name__}")


def resolve_groups(params: Dict[str, torch.Tensor],
                   groups: Optional[Mapping[str, Sequence[str]]]) -> Dict[str, List[str]]:
    """groups=None: one group per tensor, in params order. Otherwise every parameter must be in
    exactly one non-empty group."""
    if groups is None:
        return {name: [name] for name in params}
    if not isinstance(groups, Mapping):
        raise TypeError(f"groups must be a dict group name -> list of parameter names, "
                        f"got {type(groups).__name__}")
    if len(groups) == 0:
        raise ValueError("groups is empty")
    owner: Dict[str, str] = {}
    out: Dict[str, List[str]] = {}
    for gname, members in groups.items():
        if isinstance(members, str) or not isinstance(members, Sequence):
            raise TypeError(f"groups[{gname!r}] must be a list of parameter names, "
                            f"got {members!r}")
        if len(members) == 0:
            raise ValueError(f"group {gname!r} is empty")
        for m in members:
            if m not in params:
                raise ValueError(f"group {gname!r} names {m!r}, which is not in params")
            if m in owner:
                raise ValueError(f"parameter {m!r} is in more than one group "
                                 f"({owner[m]!r} and {gname!r})")
            owner[m] = gname
        out[str(gname)] = list(members)
    missing = [k for k in params if k not in owner]
    if missing:
        raise ValueError(f"parameters in no group: {missing}")
    return out


def check_batch_size(batch_size: int) -> None:
    check_positive_int(batch_size, "batch_size")


def check_samples(samples: int) -> None:
    check_int_at_least(samples, "samples", 2, "for a standard error")
