"""Snapshots of an unfinished training run, so that an interrupted run (preemption, out of memory,
Ctrl-C) resumes from its last snapshot instead of from step 0.

Every `checkpoint_every` steps the run saves DIR/NAME.partial.pt: model and optimizer state, the
step, the validation and training losses and the probe records so far. The training stream is not
saved: it is a seeded iterator, so a resumed run draws as many batches as the run had used and
goes on with the same data. The snapshot is deleted once the finished result is stored. Rank 0
reads and writes the file and broadcasts what it read, as RunStore does for finished runs.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .distributed import Context


class RunCheckpoint:
    def __init__(self, path: Path, identity: dict, ctx: Context, every: int):
        self.path, self.identity, self.ctx, self.every = Path(path), identity, ctx, every

    def due(self, step: int) -> bool:
        return self.every > 0 and step > 0 and step % self.every == 0

    def load(self) -> dict | None:
        """The snapshot's state on every rank (tensors on the CPU), or None if there is none."""
        status = None
        if self.ctx.is_main and self.every > 0 and self.path.exists():
            try:
                saved = torch.load(self.path, map_location="cpu", weights_only=True)
                stored, state = saved["identity"], saved["state"]
            except Exception as err:  # a file torch cannot read: say which one
                status = ("error", f"{self.path} is corrupt ({err}); delete it to restart that run")
            else:
                if stored != self.identity:
                    status = ("error", f"{self.path} was saved under a different configuration; "
                                       "delete it to restart that run")
                else:
                    status = ("ok", state)
        status = self.ctx.broadcast(status)
        if status is not None and status[0] == "error":
            raise ValueError(status[1])
        return None if status is None else status[1]

    def save(self, state: dict) -> None:
        if not self.ctx.is_main:
            return
        tmp = self.path.with_suffix(".tmp")
        torch.save({"identity": self.identity, "state": state}, tmp)
        tmp.replace(self.path)  # an interrupted write leaves the previous snapshot whole

    def discard(self) -> None:
        if self.ctx.is_main:
            self.path.unlink(missing_ok=True)
