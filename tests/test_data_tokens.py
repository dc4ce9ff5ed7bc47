"""The user's own token files in nanoGPT's format (uint16 train.bin / val.bin read through np.memmap)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from muonkern.data import TokenFiles, write_tokens


def _files(tmp_path, train, val):
    write_tokens(tmp_path / "train.bin", train)
    write_tokens(tmp_path / "val.bin", val)
    return tmp_path


def test_batches_are_windows_of_the_files(tmp_path):
    train, val = np.arange(5000) % 300, (np.arange(700) * 7) % 300
    data = TokenFiles(_files(tmp_path, train, val), vocab_size=300)
    assert len(data) == 5700 and data.splits["train"].dtype == np.dtype("<u2")
    x, y = next(data.batches(4, 32, "train", seed=1))
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in x:  # each row is a contiguous window of train.bin (which counts up modulo 300)
        assert torch.equal(row, (row[0] + torch.arange(32)) % 300)
    assert torch.equal(next(data.batches(4, 32, "train", seed=1))[0], x)  # deterministic
    assert not torch.equal(next(data.batches(4, 32, "train", seed=2))[0], x)
    whole = list(itertools.islice(data.batches(4, 32, "train", seed=1), 4))
    resumed = next(data.batches(4, 32, "train", seed=1, skip=3))  # a resumed run's next batch
    assert torch.equal(resumed[0], whole[3][0]) and torch.equal(resumed[1], whole[3][1])
    vx, _ = next(data.batches(2, 8, "val"))
    for row in vx:  # a window of val.bin, which steps by 7 modulo 300 (train.bin steps by 1)
        assert torch.equal((row[1:] - row[:-1]) % 300, torch.full((7,), 7))
    # ids up to 65535 round-trip through uint16
    (tmp_path / "big").mkdir()
    big = TokenFiles(_files(tmp_path / "big", [65535, 1, 2, 3] * 10, [0, 65535] * 10), vocab_size=65536)
    assert int(big.splits["train"].max()) == 65535


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.bin"):
        TokenFiles(tmp_path, vocab_size=10)
    _files(tmp_path, np.arange(100) % 10, np.arange(20) % 12)
    with pytest.raises(ValueError, match="token id 11 >= vocab_size=10"):
        TokenFiles(tmp_path, vocab_size=10)
    data = TokenFiles(tmp_path, vocab_size=12)
    with pytest.raises(ValueError, match="too short"):
        next(data.batches(2, 20, "val"))
    x, y = next(data.batches(2, 19, "val"))  # exactly context + 1 tokens: the one window
    assert x[0].tolist() == [i % 12 for i in range(19)] and y[0, -1].item() == 19 % 12
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            next(data.batches(bad, 4, "train"))
    with pytest.raises(TypeError, match="integers"):
        write_tokens(tmp_path / "x.bin", [1.5, 2.0])
    np.array([3, -5, 2, 1], dtype="<i4").tofile(tmp_path / "train.bin")
    np.array([3, 2, 1, 0], dtype="<i4").tofile(tmp_path / "val.bin")
    with pytest.raises(ValueError, match="token id -5 < 0"):
        TokenFiles(tmp_path, vocab_size=12, dtype="<i4")
    _files(tmp_path, np.arange(100) % 10, np.arange(20) % 12)
    with pytest.raises(ValueError, match="split"):
        next(data.batches(2, 4, "test"))
    (tmp_path / "val.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match="whole number"):
        TokenFiles(tmp_path, vocab_size=12)
    (tmp_path / "val.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        TokenFiles(tmp_path, vocab_size=12)
    with pytest.raises(ValueError, match="65535"):
        write_tokens(tmp_path / "x.bin", [70000])
