"""Data-parallel execution of the study (`torchrun --nproc_per_node N -m muonkern.study ...`).

Every rank builds the same model from the same seed and draws the same full batches; it keeps the
rows `shard()` gives it, and the gradients are averaged over the ranks after each backward pass
(one all-reduce of the flattened gradients), so every rank applies the same update as one process
on the whole batch, up to float rounding. Validation losses and probe quantities (gain, the block
matrix of ΔᵀHΔ, the loss change) are means over a batch, hence linear in the per-rank means of
equal slices: they are averaged with one all-reduce each. Muon itself splits the orthogonalization
of same-shape matrices among the ranks (muonkern.optim). gloo on CPU, nccl on CUDA (one GPU per
rank, `cuda:LOCAL_RANK`). Only rank 0 writes files and shows progress.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full batch (the batch size must be divisible by the world size)."""
        if not self.active:
            return t
        rows = t.shape[0] // self.world
        return t[self.rank * rows:(self.rank + 1) * rows]

    def check_divisible(self, **sizes: int) -> None:
        for name, size in sizes.items():
            if size % self.world:
                raise ValueError(f"{name}={size} is not divisible by the {self.world} data-parallel ranks")

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place mean over the ranks."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(self.world)
        return t

    def average_gradients(self, params) -> None:
        if not self.active:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.mean_(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def gather(self, obj) -> list:
        """Every rank's `obj` on every rank, in rank order (picklable objects)."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def read_on_main(self, read, share: bool = True):
        """read() on rank 0 alone, for file reads: a ValueError it raises is raised on every rank.
        Returns its value on rank 0 and, on the others, that value (share=True) or True where it is
        not None (share=False: a large result stays on rank 0)."""
        status = None
        if self.is_main:
            try:
                value = read()
                status = ("ok", value if share or value is None else True)
            except ValueError as err:
                status = ("error", str(err))
        status = self.broadcast(status)
        if status[0] == "error":
            raise ValueError(status[1])
        return value if self.is_main else status[1]

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (picklable objects)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> Context:
    """The process group already initialized, or one from torchrun's environment, or a
    single-process context."""
    if not (launched_by_torchrun() or (dist.is_available() and dist.is_initialized())):
        return Context(device=device)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if torch.cuda.device_count() <= local_rank:
            raise ValueError(f"rank with LOCAL_RANK={local_rank} has no GPU (found {torch.cuda.device_count()})")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Context(rank=dist.get_rank(), world=dist.get_world_size(), device=device)


def shutdown(ctx: Context) -> None:
    if ctx.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
