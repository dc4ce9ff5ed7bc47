"""Zipf-PCFG: a synthetic language whose data imbalance is set by Zipf exponents.

The grammar
-----------
``ZipfPCFG(config)`` builds a random probabilistic context-free grammar, fully determined by
``config.seed``:

* **Terminals** are the tokens ``0 .. vocab_size-1``. They are split evenly into ``n_classes``
  *terminal classes* of ``K = vocab_size // n_classes`` tokens each; class ``c`` holds the tokens
  ``c*K .. c*K + K-1``. The grammar's rules emit classes, not tokens.
* **Separator**: token ``vocab_size`` (i.e. ``ZipfPCFG.sep``) ends every sentence and so also
  begins the next one (EOS = BOS). The full vocabulary size of a stream is therefore
  ``vocab_size + 1`` (``ZipfPCFG.n_tokens``). A stream looks like ``s1 SEP s2 SEP s3 SEP ...``.
* **Nonterminals** ``0 .. n_nonterminals-1``; nonterminal 0 is the start symbol. Each has
  ``rules_per_symbol`` rules. The right-hand side (RHS) of a rule is a sequence of nonterminals and
  terminal classes. The first rule of every nonterminal is *all-terminal* (only classes, length
  uniform in ``1..rule_length``); every other rule has length uniform in
  ``min(2, rule_length)..rule_length`` and each position is a nonterminal with probability
  ``p_nonterminal`` (else a class), symbols drawn uniformly.
* **Rule probabilities** follow a Zipf law: the rules of each nonterminal get a random rank order
  (``1..rules_per_symbol``), and ``p(rule of rank r) ∝ r^(-rule_alpha)``.
* **Emission**: once a class is emitted, the token inside it is drawn with
  ``p(rank r) ∝ r^(-alpha)`` where ``alpha`` is the *emission exponent of the stream* (passed when
  sampling; ``config.emission_alpha`` is the default). The within-class rank order is a random
  permutation per class fixed by the seed. Training at ``alpha = s`` and validating at ``alpha = 0``
  gives the same language with imbalanced vs. uniform token frequencies.
* **Depth limit / termination**: the start symbol sits at depth 0 and the children of a symbol at
  depth ``d`` sit at depth ``d+1``. A nonterminal at depth ``max_depth - 1`` may only use its
  all-terminal rules (Zipf probabilities renormalised over them), so every derivation terminates,
  trees have at most ``max_depth`` levels of rules, and no sentence is longer than
  ``rule_length ** max_depth`` tokens (``ZipfPCFG.max_sentence_length``).

The grammar's structure (RHS sequences, rank orders, within-class permutations) does not depend on
``rule_alpha`` or ``emission_alpha``: only the probabilities do. Sampling with the same generator
seed at different emission exponents yields the same class sequence (the token draws are inverse-CDF
from the same uniforms), i.e. the streams are coupled.

Parameters (``PCFGConfig``)
---------------------------
vocab_size       number of terminal tokens (separator excluded); divisible by ``n_classes``.
n_classes        number of terminal classes.
n_nonterminals   number of nonterminal symbols (0 is the start symbol).
rules_per_symbol number of rules per nonterminal.
rule_length      maximum RHS length.
max_depth        maximum number of rule levels in a derivation tree (>= 1).
rule_alpha       Zipf exponent over each nonterminal's rules (0 = uniform).
emission_alpha   default Zipf exponent over the tokens within a class (0 = uniform).
seed             grammar seed.
p_nonterminal    probability that a position of a non-terminal rule is a nonterminal
                 (controls sentence length; 0.75 by default).

Sampling: ``sample_tokens(n, alpha, generator)`` returns a LongTensor stream of exactly ``n``
tokens; ``batches(batch_size, context, alpha, seed)`` is an infinite deterministic iterator of
``(x, y)`` pairs of shape ``(batch_size, context)`` with ``y`` = ``x`` shifted by one token;
``stats(tokens)`` summarises the imbalance of a stream.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..checks import check_window

__all__ = ["PCFGConfig", "ZipfPCFG", "stats", "zipf_probs"]


@dataclass(frozen=True)
class PCFGConfig:
    vocab_size: int = 256
    n_classes: int = 16
    n_nonterminals: int = 24
    rules_per_symbol: int = 4
    rule_length: int = 3
    max_depth: int = 6
    rule_alpha: float = 0.0
    emission_alpha: float = 0.0
    seed: int = 0
    p_nonterminal: float = 0.75

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.n_classes < 1 or self.vocab_size % self.n_classes:
            raise ValueError("vocab_size must be a positive multiple of n_classes")
        if self.n_nonterminals < 1 or self.rules_per_symbol < 1:
            raise ValueError("n_nonterminals and rules_per_symbol must be >= 1")
        if self.rule_length < 1 or self.max_depth < 1:
            raise ValueError("rule_length and max_depth must be >= 1")
        if not (0 <= self.rule_alpha < math.inf and 0 <= self.emission_alpha < math.inf):  # NaN fails too
            raise ValueError(f"Zipf exponents must be finite and >= 0, got rule_alpha={self.rule_alpha}, "
                             f"emission_alpha={self.emission_alpha}")
        if not 0.0 <= self.p_nonterminal <= 1.0:
            raise ValueError("p_nonterminal must be in [0, 1]")


def zipf_probs(ranks, alpha: float) -> np.ndarray:
    """p ∝ rank^(-alpha) for 1-based ranks, normalised."""
    w = np.asarray(ranks, dtype=np.float64) ** (-float(alpha))
    return w / w.sum()


def _np_rng(generator) -> np.random.Generator:
    """A numpy Generator from a torch.Generator (consumes one draw), an int seed or None."""
    if isinstance(generator, torch.Generator):
        s = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return np.random.default_rng(s)
    if isinstance(generator, np.random.Generator):
        return generator
    return np.random.default_rng(generator)


class ZipfPCFG:
    """Random Zipf-PCFG; see the module docstring. ``sep`` = ``vocab_size`` is the separator."""

    def __init__(self, config: PCFGConfig | None = None, **overrides) -> None:
        if config is None:
            config = PCFGConfig(**overrides)
        elif overrides:
            raise TypeError("pass either a config or keyword overrides")
        self.config = c = config
        self.class_size = c.vocab_size // c.n_classes
        self.sep = c.vocab_size
        self.n_tokens = c.vocab_size + 1
        self.max_sentence_length = c.rule_length ** c.max_depth
        rng = np.random.default_rng(c.seed)
        N, C, L = c.n_nonterminals, c.n_classes, c.rule_length
        # Symbols: nonterminal i -> i, class k -> N + k.
        self.rules: list[list[tuple[int, ...]]] = []
        for _ in range(N):
            rules = []
            for j in range(c.rules_per_symbol):
                if j == 0:
                    n = int(rng.integers(1, L + 1))
                    rhs = tuple(int(N + k) for k in rng.integers(0, C, n))
                else:
                    n = int(rng.integers(min(2, L), L + 1))
                    is_nt = rng.random(n) < c.p_nonterminal
                    nts = rng.integers(0, N, n)
                    cls = rng.integers(0, C, n)
                    rhs = tuple(int(a) if t else int(N + b) for t, a, b in zip(is_nt, nts, cls))
                rules.append(rhs)
            self.rules.append(rules)
        # Rank order of each nonterminal's rules (rank 1 = most likely).
        self.rule_ranks = np.stack([rng.permutation(c.rules_per_symbol) + 1 for _ in range(N)])
        # Within-class rank order: within_perm[c, r] = offset (in class c) of the token of rank r+1.
        self.within_perm = np.stack([rng.permutation(self.class_size) for _ in range(C)])
        self.rule_probs = np.stack([zipf_probs(r, c.rule_alpha) for r in self.rule_ranks])

        # Sampling tables: (cumulative probs, reversed RHS) for free and depth-limited expansion.
        self._free, self._term = [], []
        for i in range(N):
            p = self.rule_probs[i]
            self._free.append((np.cumsum(p).tolist(), [r[::-1] for r in self.rules[i]]))
            idx = [j for j, r in enumerate(self.rules[i]) if all(s >= N for s in r)]
            pt = p[idx] / p[idx].sum()
            self._term.append((np.cumsum(pt).tolist(), [self.rules[i][j][::-1] for j in idx]))

    # ------------------------------------------------------------------ sampling
    def _sample_classes(self, n_min: int, rng: np.random.Generator) -> np.ndarray:
        """Whole sentences of class ids (separator = -1) until at least ``n_min`` symbols."""
        N = self.config.n_nonterminals
        last = self.config.max_depth - 1
        free, term = self._free, self._term
        out: list[int] = []
        append = out.append
        uniforms: list[float] = []
        ui = 0
        while len(out) < n_min:
            stack = [(0, 0)]
            pop, push = stack.pop, stack.append
            while stack:
                sym, d = pop()
                if sym >= N:
                    append(sym - N)
                    continue
                if ui == len(uniforms):
                    uniforms = rng.random(1 << 15).tolist()
                    ui = 0
                u = uniforms[ui]
                ui += 1
                cum, rhss = term[sym] if d >= last else free[sym]
                r = bisect.bisect_right(cum, u * cum[-1])
                if r >= len(rhss):
                    r = len(rhss) - 1
                d1 = d + 1
                for s in rhss[r]:
                    push((s, d1))
            append(-1)
        return np.asarray(out, dtype=np.int64)

    def _emit(self, classes: np.ndarray, alpha: float, rng: np.random.Generator) -> np.ndarray:
        """Tokens for a class sequence (vectorised inverse-CDF Zipf draw within each class)."""
        K = self.class_size
        cdf = np.cumsum(zipf_probs(np.arange(1, K + 1), alpha))
        u = rng.random(classes.shape[0])
        rank = np.minimum(np.searchsorted(cdf, u * cdf[-1], side="right"), K - 1)
        is_sep = classes < 0
        cls = np.where(is_sep, 0, classes)
        tok = cls * K + self.within_perm[cls, rank]
        return np.where(is_sep, self.sep, tok)

    def _alpha(self, alpha) -> float:
        a = self.config.emission_alpha if alpha is None else float(alpha)
        if not (0 <= a < math.inf):  # NaN and infinity fail too
            raise ValueError(f"emission_alpha must be finite and >= 0, got {a}")
        return a

    def sample_sentences_stream(self, n_min: int, emission_alpha=None, generator=None) -> torch.Tensor:
        """Whole sentences (each ending in ``sep``), at least ``n_min`` tokens in all."""
        rng = _np_rng(generator)
        classes = self._sample_classes(n_min, rng)
        return torch.from_numpy(self._emit(classes, self._alpha(emission_alpha), rng))

    def sample_tokens(self, n_tokens: int, emission_alpha=None, generator=None) -> torch.Tensor:
        """A LongTensor stream of exactly ``n_tokens`` tokens (the last sentence may be cut).

        ``generator``: torch.Generator (one draw is consumed), int seed or None (fresh entropy).
        """
        return self.sample_sentences_stream(n_tokens, emission_alpha, generator)[:n_tokens].clone()

    def batches(self, batch_size: int, context: int, emission_alpha=None, seed: int = 0,
                chunk_tokens: int = 1 << 16) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Infinite deterministic iterator of ``(x, y)``, each LongTensor ``(batch_size, context)``.

        Consecutive windows of ``context + 1`` tokens are cut from one continuous stream (built from
        whole sentences, so no sentence is broken at chunk joins); ``y = x`` shifted by one. Same
        ``seed`` and alpha -> same batches.
        """
        check_window(batch_size, context)
        gen = torch.Generator().manual_seed(int(seed))
        alpha = self._alpha(emission_alpha)
        need = batch_size * (context + 1)
        buf = torch.empty(0, dtype=torch.long)
        while True:
            while buf.numel() < need:
                more = self.sample_sentences_stream(max(chunk_tokens, need), alpha, gen)
                buf = torch.cat([buf, more])
            w = buf[:need].view(batch_size, context + 1)
            buf = buf[need:]
            yield w[:, :-1].clone(), w[:, 1:].clone()

    def stats(self, tokens) -> dict:
        """``stats`` with this grammar's separator and vocabulary size."""
        return stats(tokens, separator=self.sep, vocab_size=self.config.vocab_size)


def stats(tokens, separator: int | None = None, vocab_size: int | None = None) -> dict:
    """Summary of a token stream's imbalance.

    ``separator``: the sentence separator token (default: the largest token id present). Terminal
    statistics ignore separators. ``vocab_size``: number of terminal tokens, used for the top-10%
    set (``ceil(0.1 * vocab_size)`` tokens, unseen ones counting as zero); default: distinct
    terminals observed.

    Returns ``n_tokens`` (all, separators included), ``n_sentences`` (complete sentences = non-empty
    runs terminated by a separator; a trailing unterminated run is not counted),
    ``mean_sentence_length`` (terminals per complete sentence), ``unigram_entropy`` (nats, over
    terminals), ``top10_mass`` (fraction of terminal occurrences on the most frequent 10% of the
    vocabulary) and ``zipf_slope`` (least-squares slope of log count vs log rank over the observed
    terminals; negative, steeper = more imbalanced).
    """
    t = torch.as_tensor(tokens).reshape(-1).cpu().numpy().astype(np.int64)
    if separator is None:
        separator = int(t.max()) if t.size else 0
    is_sep = t == separator
    term = t[~is_sep]
    sep_pos = np.flatnonzero(is_sep)
    starts = np.concatenate([[0], sep_pos[:-1] + 1]) if sep_pos.size else np.empty(0, np.int64)
    lengths = sep_pos - starts
    lengths = lengths[lengths > 0]
    counts = np.bincount(term) if term.size else np.zeros(0, np.int64)   # separators left out above
    observed = np.sort(counts[counts > 0])[::-1].astype(np.float64)
    n_term = observed.sum()
    V = vocab_size if vocab_size is not None else observed.size
    k = max(1, math.ceil(0.1 * V))
    if n_term > 0:
        p = observed / n_term
        entropy = float(-(p * np.log(p)).sum())
        top10 = float(observed[:k].sum() / n_term)
    else:
        entropy = top10 = float("nan")
    if observed.size >= 2:
        x = np.log(np.arange(1, observed.size + 1))
        slope = float(np.polyfit(x, np.log(observed), 1)[0])
    else:
        slope = float("nan")
    return {
        "n_tokens": int(t.size),
        "n_sentences": int(lengths.size),
        "mean_sentence_length": float(lengths.mean()) if lengths.size else float("nan"),
        "unigram_entropy": entropy,
        "top10_mass": top10,
        "zipf_slope": slope,
    }
