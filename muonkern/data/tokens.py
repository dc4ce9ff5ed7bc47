"""The user's own tokens in nanoGPT's format: `train.bin` and `val.bin` in one directory, each a flat
array of token ids stored as little-endian uint16 (`np.array(ids, dtype=np.uint16).tofile(path)`),
read through `np.memmap` so files larger than memory work. Batches are random windows, as in
nanoGPT's `get_batch`, drawn from a seeded generator (deterministic)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

SPLITS = ("train", "val")


def check_window(batch_size: int, context: int) -> None:
    """Batch sizes and contexts of the loaders: ints >= 1 (a zero or negative one gave empty batches)."""
    for name, value in (("batch_size", batch_size), ("context", context)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
_SCAN_CHUNK = 1 << 24  # tokens per chunk when checking the id range


class TokenFiles:
    """`data_dir/train.bin` and `data_dir/val.bin`, with every token id < vocab_size."""

    def __init__(self, data_dir, vocab_size: int, dtype="<u2"):
        self.data_dir = Path(data_dir)
        self.vocab_size = int(vocab_size)
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.splits = {}
        for split in SPLITS:
            path = self.data_dir / f"{split}.bin"
            if not path.is_file():
                raise FileNotFoundError(f"token file {path} not found: dataset=bin expects train.bin and "
                                        f"val.bin (uint16 token ids, nanoGPT's format) in data_dir")
            size = path.stat().st_size
            if size % np.dtype(dtype).itemsize:
                raise ValueError(f"{path} has {size} bytes, not a whole number of {np.dtype(dtype).name} tokens")
            if size == 0:
                raise ValueError(f"{path} is empty")
            tokens = np.memmap(path, dtype=dtype, mode="r")
            if tokens.dtype.kind not in "iu":
                raise TypeError(f"token files hold integer ids, got dtype {tokens.dtype}")
            chunks = range(0, len(tokens), _SCAN_CHUNK)
            low = min(int(tokens[i:i + _SCAN_CHUNK].min()) for i in chunks) if tokens.dtype.kind == "i" else 0
            if low < 0:
                raise ValueError(f"{path} holds token id {low} < 0")
            top = max(int(tokens[i:i + _SCAN_CHUNK].max()) for i in chunks)
            if top >= self.vocab_size:
                raise ValueError(f"{path} holds token id {top} >= vocab_size={self.vocab_size}; "
                                 f"set --set vocab_size to at least {top + 1}")
            self.splits[split] = tokens

    def __len__(self) -> int:
        return sum(len(t) for t in self.splits.values())

    def batches(self, batch_size: int, context: int, split: str = "train",
                seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Infinite, deterministic (x, y) batches of random windows, LongTensors (batch_size, context);
        y is x shifted by one token."""
        if split not in self.splits:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        data = self.splits[split]
        check_window(batch_size, context)
        if len(data) < context + 1:
            raise ValueError(f"{self.data_dir / (split + '.bin')} holds {len(data)} tokens, too short for "
                             f"context {context} (needs at least context + 1 = {context + 1})")
        gen = torch.Generator().manual_seed(seed)
        while True:
            # every window of context + 1 tokens, the last one included (nanoGPT's get_batch)
            starts = torch.randint(0, len(data) - context, (batch_size,), generator=gen).tolist()
            window = torch.from_numpy(np.stack([data[s:s + context + 1].astype(np.int64) for s in starts]))
            yield window[:, :-1], window[:, 1:]


def write_tokens(path, ids) -> Path:
    """Writes token ids as a nanoGPT-style uint16 .bin file (ids must be in [0, 65535])."""
    ids = np.asarray(ids)
    if ids.size and ids.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.uint16).max):
        raise ValueError("uint16 token files hold ids in [0, 65535]")
    path = Path(path)
    ids.astype("<u2").tofile(path)
    return path
