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


def write_atomically(path: Path, write) -> None:
    """write(tmp) then tmp -> path: an interrupted write leaves the previous file whole, or none."""
    tmp = Path(path).with_suffix(".tmp")
    write(tmp)
    tmp.replace(path)


class RunCheckpoint:
    def __init__(self, path: Path, identity: dict, ctx: Context, every: int):
        self.path, self.identity, self.ctx, self.every = Path(path), identity, ctx, every

    def due(self, step: int) -> bool:
        return self.every > 0 and step > 0 and step % self.every == 0

    def load(self) -> dict | None:
        """The snapshot's state on every rank (tensors on the CPU), or None if there is none."""
        return self.ctx.read_on_main(self._read)

    def _read(self) -> dict | None:
        if self.every <= 0 or not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            stored, state = saved["identity"], saved["state"]
        except Exception as err:  # a file torch cannot read: say which one
            raise ValueError(f"{self.path} is corrupt ({err}); delete it to restart that run") from err
        if stored != self.identity:
            raise ValueError(f"{self.path} was saved under a different configuration; delete it to restart that run")
        return state

    def save(self, state) -> None:
        """Saves state() (built on rank 0 alone)."""
        if self.ctx.is_main:
            write_atomically(self.path, lambda tmp: torch.save({"identity": self.identity, "state": state()}, tmp))

    def discard(self) -> None:
        if self.ctx.is_main:
            self.path.unlink(missing_ok=True)
