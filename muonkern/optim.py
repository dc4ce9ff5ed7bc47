"""muonkern.optim.Muon: Muon for matrices and AdamW for the rest, in one optimizer.

For a matrix parameter (KellerJordan/Muon's semantics by default):
    buf = momentum * buf + (1 - momentum) * grad
    u   = lerp(grad, buf, momentum) if nesterov else buf
    p  *= 1 - lr * weight_decay
    p  -= lr * scale * ns5(u)          scale = max(1, rows/cols)^0.5  ("original")
                                       scale = 0.2 * max(rows, cols)^0.5  ("match_rms_adamw", Moonlight)
Conv weights (out, in, kh, kw) are orthogonalized as (out, in*kh*kw); 3-D parameters (stacked
experts) per leading index, unless their group sets `flatten=True` (every parameter as
(shape[0], rest): muon_param_groups sets it for the weights of conv layers, Conv1d's 3-D ones
included); a group's `split_rows=s` orthogonalizes each block of s rows on its own (fused QKV, heads). Matrices of one shape go through ns5 as one batch; the elementwise work is
torch._foreach ops. Nothing is written into p.grad, and the update never aliases the momentum buffer.

Other parameters (ndim < 2 by default, or groups with use_muon=False) get AdamW with the adamw_*
hyperparameters; in those groups `lr` holds AdamW's learning rate (initialized from adamw_lr), so a
learning-rate scheduler scales Muon and AdamW alike.

Distributed: with torch.distributed initialized and plain (replicated) parameters, as under DDP,
each rank orthogonalizes its share of every same-shape batch and the results are all-gathered. The
first step checks that the ranks hold the same matrices (shapes and norms) and raises if not;
`distribute=False` keeps every rank to its own parameters (pipeline or tensor parallelism). DTensor
(FSDP2) parameters are gathered whole, orthogonalized, and re-sharded like the parameter.
"""
from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections import defaultdict
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .ops import ns5
from .ops.ns5_args import resolve_coefficients
from .ops.ns5_routing import checked_route

__all__ = ["Muon", "muon_param_groups"]

_ADJUST_LR = ("original", "match_rms_adamw")

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch without DTensor
    DTensor, distribute_tensor = (), None
# distribute_tensor(..., src_data_rank=None): each rank keeps its shard of a tensor all ranks hold
_LOCAL_SHARDS = ({"src_data_rank": None} if distribute_tensor is not None
                 and "src_data_rank" in inspect.signature(distribute_tensor).parameters else {})
# keys torch's learning-rate and momentum schedulers add to a group (Muon(other.param_groups) works)
_SCHEDULER_KEYS = {"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"}


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, coefficients="jordan",
                 adjust_lr: str = "original", adamw_lr: float = 3e-4,
                 adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-8,
                 adamw_weight_decay: float = 0.0, *, process_group=None, distribute: bool = True):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, coefficients=coefficients, adjust_lr=adjust_lr,
                        adamw_lr=adamw_lr, adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps,
                        adamw_weight_decay=adamw_weight_decay, use_muon=None, split_rows=None, flatten=None)
        if not isinstance(distribute, bool):
            raise TypeError(f"Muon: distribute must be True or False, got {distribute!r}")
        self.process_group = process_group
        self.distribute = distribute
        self._replication_checked = False
        super().__init__(params, defaults)

    # ---- parameter groups -------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        unknown = set(param_group) - set(self.defaults) - {"params", "name"} - _SCHEDULER_KEYS
        if unknown:
            raise ValueError(f"Muon: unknown option(s) {sorted(unknown)}; known: {sorted(self.defaults)}")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        params = [p[1] if isinstance(p, tuple) else p for p in params]  # named_parameters() works too
        for p in params:
            if not isinstance(p, torch.Tensor) or not p.is_floating_point():   # complex is not floating point
                raise TypeError(f"Muon: parameters must be real floating-point tensors, got "
                                f"{p.dtype if isinstance(p, torch.Tensor) else type(p).__name__}")
        if param_group.get("use_muon") is None:
            if "lr" in param_group and "adamw_lr" not in param_group and any(p.ndim < 2 for p in params):
                # the decay/no-decay pattern of other optimizers: that lr would reach the matrices only
                warnings.warn("Muon: a group's lr is Muon's learning rate; its non-matrix parameters run "
                              "AdamW at the optimizer's adamw_lr. Set adamw_lr in the group too, or "
                              "use_muon=False for an AdamW-only group", UserWarning, stacklevel=3)
            # Matrices (and conv kernels, stacked experts) to Muon, the rest to AdamW.
            for use_muon in (True, False):
                chosen = [p for p in params if (p.ndim >= 2) == use_muon]
                if chosen:
                    half = {**param_group, "params": chosen, "use_muon": use_muon}
                    if not use_muon:
                        half.pop("lr", None)  # the group's lr is Muon's; the AdamW half takes adamw_lr
                    self.add_param_group(half)
            return
        group = {**param_group, "params": params}
        if not group["use_muon"] and "lr" not in param_group:
            # In an AdamW group `lr` is AdamW's learning rate, so LR schedulers scale both kinds.
            group["lr"] = group.get("adamw_lr", self.defaults["adamw_lr"])
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        _check_group(group)
        super().add_param_group(group)

    # ---- step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # every group's gradients are checked before any state changes: an error leaves all as it was
        stepped = [[p for p in group["params"] if p.grad is not None and p.numel() > 0] for group in self.param_groups]
        for params in stepped:
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                if p.grad.is_complex():
                    raise RuntimeError("Muon does not support complex parameters or gradients")
        if not self._replication_checked and self._world_size() > 1:
            self._check_replicated(stepped)
            self._replication_checked = True
        for group, params in zip(self.param_groups, stepped):
            if params:
                (self._muon_step if group["use_muon"] else self._adamw_step)(group, params)
        return loss

    def _world_size(self) -> int:
        return _world_size(self.process_group) if self.distribute else 1

    def _check_replicated(self, stepped: list[list[torch.Tensor]]) -> None:
        """Sharing the orthogonalization needs every rank to hold the same matrices (DDP). Compares,
        per same-shape batch, the count, the shape and the squared norm across the ranks: two
        collectives, first step only. Under pipeline or tensor parallelism the ranks hold different
        matrices, which would silently receive other ranks' updates, or hang a collective."""
        device = next((p.device for params in stepped for p in params), torch.device("cpu"))
        counts, norms = [], []   # per bucket: (count, rows, cols) and the squared norm of its matrices
        for group, params in zip(self.param_groups, stepped):
            plain = [p for p in params if not isinstance(p, DTensor)]
            if not group["use_muon"] or not plain:
                continue
            for key, members in _buckets(plain, plain, group["split_rows"], group["flatten"]).items():
                counts.append((len(members), key[0], key[1]))
                norms.append(torch.stack([p.detach().double().square().sum() for p, _ in members]).sum().to(device))
        table = (torch.cat([torch.tensor(counts, dtype=torch.float64, device=device), torch.stack(norms)[:, None]], 1)
                 if counts else torch.zeros(1, 4, dtype=torch.float64, device=device))
        # the table sizes first (a collective on tables of different sizes would hang), then the
        # tables and their negatives in one MAX: the maximum and minus the minimum of every entry
        size = torch.tensor([table.shape[0], -table.shape[0]], dtype=torch.float64, device=device)
        dist.all_reduce(size, op=dist.ReduceOp.MAX, group=self.process_group)
        same = bool(size[0] == -size[1])
        if same:
            both = torch.cat([table, -table])
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.process_group)
            high, low = both[:len(table)], -both[len(table):]
            same = torch.equal(high[:, :3], low[:, :3]) and bool(
                ((high[:, 3] - low[:, 3]).abs() <= 1e-9 * high[:, 3].abs()).all())
        if not same:
            raise RuntimeError(
                "Muon: the ranks of the process group hold different matrices (shapes, counts or values), "
                "so they cannot share the orthogonalization; it needs replicated parameters, as under DDP. "
                "Pass distribute=False to orthogonalize each rank's own parameters, or process_group= "
                "for the group over which they are replicated")

    def _muon_step(self, group: dict, params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        beta = group["momentum"]
        _foreach(torch._foreach_lerp_, bufs, grads, 1 - beta)
        # New tensors (nesterov) or the buffers themselves, which ns5 only reads.
        updates = _foreach(torch._foreach_lerp, grads, bufs, beta) if group["nesterov"] else bufs
        lr, wd = group["lr"], group["weight_decay"]
        if wd != 0:
            _scale_(params, 1 - lr * wd)
        coefficients = resolve_coefficients(group["coefficients"], group["ns_steps"])
        for (rows, cols, *_), members in _buckets(params, updates, group["split_rows"], group["flatten"]).items():
            scale = (max(1.0, rows / cols) ** 0.5 if group["adjust_lr"] == "original"
                     else 0.2 * math.sqrt(max(rows, cols)))
            plist = [p for p, _ in members]
            if isinstance(members[0][1], DTensor):
                ortho = [self._orthogonalize_dtensor(u, group, coefficients) for _, u in members]
            else:
                ortho = self._orthogonalize_batch([u for _, u in members], group, coefficients)
            _foreach(torch._foreach_add_, plist, [o.view_as(p) for p, o in zip(plist, ortho)], alpha=-lr * scale)

    def _orthogonalize_batch(self, updates: list[torch.Tensor], group: dict, coefficients) -> list[torch.Tensor]:
        """ns5 of same-shape matrices as one batch; across ranks, each rank takes a share."""
        views = [_matrix_view(u, group["split_rows"], group["flatten"]) for u in updates]
        counts = [v.numel() // (v.shape[-2] * v.shape[-1]) for v in views]
        stacked = torch.cat([v.reshape(-1, *v.shape[-2:]) for v in views])
        world = self._world_size()
        if world > 1:
            # "auto" decided on the whole batch, not on each rank's share: every world size runs the
            # algorithm one process runs (ns5 of the batch)
            algorithm = checked_route(stacked, group["ns_steps"], "auto").algorithm
            rank = dist.get_rank(self.process_group)
            share = -(-stacked.shape[0] // world)
            padded = torch.cat([stacked, stacked.new_zeros(share * world - stacked.shape[0], *stacked.shape[1:])])
            mine = ns5(padded[rank * share:(rank + 1) * share], group["ns_steps"], coefficients,
                       algorithm=algorithm).contiguous()
            gathered = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(gathered, mine, group=self.process_group)
            result = torch.cat(gathered)[:stacked.shape[0]]
        else:
            result = ns5(stacked, group["ns_steps"], coefficients)
        return list(result.split(counts))

    @staticmethod
    def _orthogonalize_dtensor(update, group: dict, coefficients):
        """A sharded matrix is gathered whole, orthogonalized, and sharded back like the parameter."""
        full = update.full_tensor()
        ortho = ns5(_matrix_view(full, group["split_rows"], group["flatten"]), group["ns_steps"], coefficients)
        # every rank holds the whole result: each keeps its shard, nothing is sent
        return distribute_tensor(ortho.view_as(full), update.device_mesh, update.placements, **_LOCAL_SHARDS)

    def _adamw_step(self, group: dict, params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["adamw_betas"]
        lr, eps, wd = group["lr"], group["adamw_eps"], group["adamw_weight_decay"]
        by_step = defaultdict(list)  # parameters that missed steps keep their own bias correction
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            by_step[state["step"]].append(p)
        for step, ps in by_step.items():
            grads = [p.grad for p in ps]
            exp_avgs = [self.state[p]["exp_avg"] for p in ps]
            exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in ps]
            _foreach(torch._foreach_lerp_, exp_avgs, grads, 1 - beta1)
            _scale_(exp_avg_sqs, beta2)
            _foreach(torch._foreach_addcmul_, exp_avg_sqs, grads, grads, value=1 - beta2)
            denom = _foreach(torch._foreach_sqrt, exp_avg_sqs)
            _foreach(torch._foreach_div_, denom, math.sqrt(1 - beta2 ** step))
            _foreach(torch._foreach_add_, denom, eps)
            if wd != 0:
                _scale_(ps, 1 - lr * wd)
            _foreach(torch._foreach_addcdiv_, ps, exp_avgs, denom, value=-lr / (1 - beta1 ** step))


def muon_param_groups(model: nn.Module, head_names: Iterable[str] = ("lm_head", "head", "output", "classifier"),
                      **muon_options) -> list[dict]:
    """Splits a model the usual way: hidden matrices to Muon (conv weights in a group of their own
    with flatten=True); embeddings, the output head (modules named in `head_names`, or weights tied
    to an embedding), norms and biases to AdamW. Extra keyword arguments go into the Muon groups, and
    the adamw_* ones into the AdamW group too."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    conv_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)}
    head_params = set()
    for name, module in model.named_modules():
        if name.split(".")[-1] in head_names:
            head_params.update(id(p) for p in module.parameters())
    muon, conv, adamw, seen = [], [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        hidden_matrix = p.ndim >= 2 and id(p) not in embeddings and id(p) not in head_params
        (adamw if not hidden_matrix else conv if id(p) in conv_weights else muon).append(p)
    adamw_options = {k: v for k, v in muon_options.items() if k.startswith("adamw_")}
    groups = [{"params": muon, "use_muon": True, **muon_options}] if muon else []
    # conv kernels as (out, in*k...): Conv1d's 3-D weight is one matrix, not a stack of experts
    groups += [{"params": conv, "use_muon": True, "flatten": True, **muon_options}] if conv else []
    return groups + ([{"params": adamw, "use_muon": False, **adamw_options}] if adamw else [])


# ---- helpers ------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _finite_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_group(group: dict) -> None:
    for key in ("lr", "momentum", "weight_decay", "adamw_lr", "adamw_eps", "adamw_weight_decay"):
        if not _finite_number(group[key]):
            raise ValueError(f"Muon: {key} must be a finite number, got {group[key]!r}")
    if not isinstance(group["nesterov"], bool):
        raise TypeError(f"Muon: nesterov must be True or False, got {group['nesterov']!r}")
    if group["flatten"] is not None and not isinstance(group["flatten"], bool):
        raise TypeError(f"Muon: flatten must be None, True or False, got {group['flatten']!r}")
    if not _is_int(group["ns_steps"]):
        raise TypeError(f"Muon: ns_steps must be an int, got {group['ns_steps']!r}")
    if group["split_rows"] is not None and not (_is_int(group["split_rows"]) and group["split_rows"] > 0):
        raise ValueError(f"Muon: split_rows must be None or an int > 0, got {group['split_rows']!r}")
    if group["use_muon"]:
        bad = [tuple(p.shape) for p in group["params"] if p.ndim < 2]
        if bad:
            raise ValueError(f"Muon: use_muon=True needs parameters with ndim >= 2, got shapes {bad}")
    if not 0 <= group["momentum"] < 1:
        raise ValueError(f"Muon: momentum must be in [0, 1), got {group['momentum']}")
    if group["lr"] < 0 or group["adamw_lr"] < 0:
        raise ValueError(f"Muon: learning rates must be >= 0, got lr={group['lr']}, adamw_lr={group['adamw_lr']}")
    if group["weight_decay"] < 0 or group["adamw_weight_decay"] < 0:
        raise ValueError("Muon: weight decay must be >= 0")
    if group["adjust_lr"] not in _ADJUST_LR:
        raise ValueError(f"Muon: adjust_lr must be one of {_ADJUST_LR}, got {group['adjust_lr']!r}")
    if len(group["adamw_betas"]) != 2 or not all(_finite_number(b) and 0 <= b < 1 for b in group["adamw_betas"]):
        raise ValueError(f"Muon: adamw_betas must be two numbers in [0, 1), got {group['adamw_betas']}")
    if not group["adamw_eps"] > 0:
        raise ValueError(f"Muon: adamw_eps must be positive, got {group['adamw_eps']}")
    if group["ns_steps"] < 0:
        raise ValueError(f"Muon: ns_steps must be >= 0, got {group['ns_steps']}")
    resolve_coefficients(group["coefficients"], group["ns_steps"])  # raises on a bad preset or length
    split = group["split_rows"]
    if split is not None and group["use_muon"]:
        bad = [tuple(p.shape) for p in group["params"] if p.numel() and _matrix_shape(p, group["flatten"])[0] % split]
        if bad:
            raise ValueError(f"Muon: split_rows={split} must divide the rows of every matrix, got shapes {bad}")


def _flattened(t: torch.Tensor, flatten: bool | None) -> bool:
    """Whether t is one (shape[0], rest) matrix: 4-D and more always (conv kernels), any t with
    flatten=True (Conv1d's 3-D kernels), else 3-D is a batch of matrices (stacked experts)."""
    return t.ndim >= 4 or bool(flatten)


def _matrix_shape(t: torch.Tensor, flatten: bool | None) -> tuple[int, int]:
    return (t.shape[0], t[0].numel()) if _flattened(t, flatten) else (t.shape[-2], t.shape[-1])


def _matrix_view(t: torch.Tensor, split_rows: int | None, flatten: bool | None) -> torch.Tensor:
    """(..., rows, cols) as ns5 sees it: conv kernels flattened to (out, in*kh*kw), 3-D kept as a batch
    (unless flattened), rows cut into blocks of split_rows."""
    view = t.reshape(t.shape[0], -1) if _flattened(t, flatten) else t
    if split_rows is not None:
        view = view.reshape(*view.shape[:-2], view.shape[-2] // split_rows, split_rows, view.shape[-1])
    return view


def _buckets(params, updates, split_rows, flatten) -> dict:
    """(param, update) pairs keyed by the matrix shape ns5 sees, dtype and device."""
    buckets = defaultdict(list)
    for p, u in zip(params, updates):
        rows, cols = _matrix_shape(p, flatten)
        buckets[(split_rows or rows, cols, str(u.dtype), str(u.device), isinstance(u, DTensor))].append((p, u))
    return buckets


def _foreach(op, *lists, **kwargs):
    """A torch._foreach op, or its per-tensor loop for DTensors (not every foreach op shards)."""
    if not any(isinstance(t, DTensor) for t in lists[0]):
        return op(*lists, **kwargs)
    name = op.__name__.replace("_foreach_", "")
    scalars = [a for a in lists if not isinstance(a, list)]
    tensors = [a for a in lists if isinstance(a, list)]
    results = [getattr(torch.Tensor, name)(*items, *scalars, **kwargs) for items in zip(*tensors)]
    return None if name.endswith("_") else results


def _scale_(tensors: list[torch.Tensor], factor: float) -> None:
    """tensors *= factor. The CPU foreach kernel rounds the factor to a bf16/fp16 tensor's dtype
    (0.998 -> 0.9961 in bf16), so low-precision tensors are scaled one by one, as Tensor.mul_ does
    with the factor in fp32."""
    exact = [t for t in tensors if t.dtype in (torch.float32, torch.float64)]
    if exact:
        _foreach(torch._foreach_mul_, exact, factor)
    for t in tensors:
        if t.dtype not in (torch.float32, torch.float64):
            t.mul_(factor)


def _world_size(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
