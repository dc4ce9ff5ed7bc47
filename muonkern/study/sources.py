"""The batches of one run: training stream, fixed validation batches, fixed probe batch.

A run is determined by (training alpha, seed): the seed fixes the three streams (so both optimizers
of a seed see the same data in the same order) and the model's initialization. Validation batches
come from the balanced language (alpha = val_alpha) or the validation split; the probe batch from
the training distribution (or split), apart from the training stream. Under data parallelism every
rank draws the full batches and keeps its rows (distributed.Context.shard).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import torch

from ..data import PCFGConfig, TokenFiles, ZipfPCFG, load_shakespeare
from ..data.text import VOCAB_SIZE as BYTE_VOCAB_SIZE
from .config import StudyConfig
from .distributed import Context

_TRAIN, _VAL, _PROBE = 1, 2, 3  # stream ids: seeds are 1000 * seed + stream id


@dataclass
class Streams:
    vocab_size: int
    train: Iterator[tuple[torch.Tensor, torch.Tensor]]
    val: list[tuple[torch.Tensor, torch.Tensor]]
    probe: tuple[torch.Tensor, torch.Tensor]


def vocab_size(cfg: StudyConfig) -> int:
    """The model's vocabulary for cfg's dataset."""
    if cfg.dataset == "pcfg":
        return cfg.vocab_size + 1  # the sentence separator
    if cfg.dataset == "shakespeare":
        return BYTE_VOCAB_SIZE
    return cfg.vocab_size


@lru_cache(maxsize=4)
def _grammar(vocab_size: int, n_classes: int, seed: int) -> ZipfPCFG:
    return ZipfPCFG(PCFGConfig(vocab_size=vocab_size, n_classes=n_classes, seed=seed))


@lru_cache(maxsize=4)
def _corpus(dataset: str, data_dir: str, vocab_size: int):
    # built once per process: TokenFiles scans every token of both files to check the id range
    return load_shakespeare() if dataset == "shakespeare" else TokenFiles(data_dir, vocab_size)


def _sources(cfg: StudyConfig, alpha: float, seed: int):
    """batches(size, role, skip=0) -> an iterator of full (x, y) batches for role train/val/probe,
    after its first `skip` batches. The grammar or corpus is shared by every run of the process
    (the sweep's and the main runs)."""
    stream_seed = {"train": 1000 * seed + _TRAIN, "val": 1000 * seed + _VAL, "probe": 1000 * seed + _PROBE}
    if cfg.dataset == "pcfg":
        grammar = _grammar(cfg.vocab_size, cfg.n_classes, cfg.grammar_seed)
        exponent = {"train": alpha, "val": cfg.val_alpha, "probe": alpha}
        # the grammar's stream is sequential: skipped batches are sampled and dropped
        return lambda size, role, skip=0: itertools.islice(
            grammar.batches(size, cfg.context, emission_alpha=exponent[role], seed=stream_seed[role]), skip, None)
    corpus = _corpus(cfg.dataset, cfg.data_dir, cfg.vocab_size)
    split = {"train": "train", "val": "val", "probe": "train"}
    # random windows: skipped batches cost their starts only
    return lambda size, role, skip=0: corpus.batches(size, cfg.context, split[role], seed=stream_seed[role], skip=skip)


def make_streams(cfg: StudyConfig, alpha: float, seed: int, ctx: Context, skip: int = 0) -> Streams:
    """The run's streams; the training stream after its first `skip` batches (a resumed run)."""
    ctx.check_divisible(batch_size=cfg.batch_size, probe_batch_size=cfg.probe_batch_size)
    batches = _sources(cfg, alpha, seed)
    device = ctx.device

    def local(batch):
        return tuple(ctx.shard(t).to(device) for t in batch)

    def train():
        for batch in batches(cfg.batch_size, "train", skip):
            yield local(batch)

    val_source = batches(cfg.batch_size, "val")
    val = [local(next(val_source)) for _ in range(cfg.val_batches)]
    probe = local(next(batches(cfg.probe_batch_size, "probe")))
    return Streams(vocab_size(cfg), train(), val, probe)
