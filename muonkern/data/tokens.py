"""The user's own tokens in nanoGPT's format: `train.bin` and `val.bin` in one directory, each a flat
array of token ids stored as little-endian uint16 (`np.array(ids, dtype=np.uint16).tofile(path)`),
read through `np.memmap` so files larger than memory work. Batches are random windows, as in
nanoGPT's `get_batch`, drawn from a seeded generator (deterministic)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..checks import check_window

SPLITS = ("train", "val")


def window_starts(n_tokens: int, batch_size: int, context: int, seed: int, skip: int = 0) -> Iterator[torch.Tensor]:
    """Seeded starts (batch_size,) of random windows of context + 1 tokens in a stream of n_tokens:
    every window, the last one included (nanoGPT's get_batch). ``skip``: the starts after the
    first ``skip`` batches' (a resumed run), drawn without reading any window."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(skip):
        torch.randint(0, n_tokens - context, (batch_size,), generator=gen)
    while True:
        yield torch.randint(0, n_tokens - context, (batch_size,), generator=gen)


_SCAN_CHUNK = 1 << 24  # tokens per chunk when checking the id range


class TokenFiles:
    """`data_dir/train.bin` and `data_dir/val.bin`, with every token id < vocab_size."""

    def __init__(self, data_dir, vocab_size: int, dtype="<u2"):
        self.data_dir = Path(data_dir)
        self.vocab_size = int(vocab_size)
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if np.dtype(dtype).kind not in "iu":
            raise TypeError(f"token files hold integer ids, got dtype {np.dtype(dtype)}")
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
            # one pass over the file, chunk by chunk: the highest id, and the lowest for a signed dtype
            low = top = 0
            signed = tokens.dtype.kind == "i"
            for i in range(0, len(tokens), _SCAN_CHUNK):
                chunk = tokens[i:i + _SCAN_CHUNK]
                top = max(top, int(chunk.max()))
                if signed:
                    low = min(low, int(chunk.min()))
            if low < 0:
                raise ValueError(f"{path} holds token id {low} < 0")
            if top >= self.vocab_size:
                raise ValueError(f"{path} holds token id {top} >= vocab_size={self.vocab_size}; "
                                 f"set --set vocab_size to at least {top + 1}")
            self.splits[split] = tokens

    def __len__(self) -> int:
        return sum(len(t) for t in self.splits.values())

    def batches(self, batch_size: int, context: int, split: str = "train",
                seed: int = 0, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Infinite, deterministic (x, y) batches of random windows, LongTensors (batch_size, context);
        y is x shifted by one token. ``skip``: start after the first ``skip`` batches."""
        if split not in self.splits:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        data = self.splits[split]
        check_window(batch_size, context)
        if len(data) < context + 1:
            raise ValueError(f"{self.data_dir / (split + '.bin')} holds {len(data)} tokens, too short for "
                             f"context {context} (needs at least context + 1 = {context + 1})")
        for starts in window_starts(len(data), batch_size, context, seed, skip):
            window = torch.from_numpy(np.stack([data[s:s + context + 1].astype(np.int64) for s in starts.tolist()]))
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
