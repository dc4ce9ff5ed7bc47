"""Tests for the Zipf-PCFG synthetic language (muonkern.data.zipf_pcfg)."""
import math

import numpy as np
import pytest
import torch

from muonkern.data import PCFGConfig, ZipfPCFG, stats

N_TOK = 200_000


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def grammar():
    return ZipfPCFG(PCFGConfig(seed=0))


@pytest.fixture(scope="module")
def streams(grammar):
    """Same generator seed at each emission exponent (coupled streams)."""
    return {a: grammar.sample_tokens(N_TOK, a, _gen(1)) for a in (0.0, 0.5, 1.0, 1.5)}


def _sentences(t, sep):
    t = t.tolist()
    out, cur = [], []
    for v in t:
        if v == sep:
            out.append(cur)
            cur = []
        else:
            cur.append(v)
    return out  # complete sentences only


def test_determinism():
    cfg = PCFGConfig(seed=3)
    a = ZipfPCFG(cfg).sample_tokens(20_000, 1.0, _gen(7))
    b = ZipfPCFG(cfg).sample_tokens(20_000, 1.0, _gen(7))
    assert a.dtype == torch.long and a.shape == (20_000,)
    assert torch.equal(a, b)
    # Different generator seed, same grammar -> different stream.
    assert not torch.equal(a, ZipfPCFG(cfg).sample_tokens(20_000, 1.0, _gen(8)))
    # Different grammar seed, same generator seed -> different grammar and stream.
    g4 = ZipfPCFG(PCFGConfig(seed=4))
    assert g4.rules != ZipfPCFG(cfg).rules
    assert not torch.equal(a, g4.sample_tokens(20_000, 1.0, _gen(7)))
    # Grammar structure does not depend on the exponents; only probabilities do.
    g_ra = ZipfPCFG(PCFGConfig(seed=3, rule_alpha=2.0, emission_alpha=1.0))
    assert g_ra.rules == ZipfPCFG(cfg).rules
    assert np.array_equal(g_ra.within_perm, ZipfPCFG(cfg).within_perm)
    # Batches are deterministic from their seed.
    it1, it2, it3 = (ZipfPCFG(cfg).batches(4, 32, 1.0, seed=s) for s in (5, 5, 6))
    for _ in range(3):
        (x1, y1), (x2, y2), (x3, _) = next(it1), next(it2), next(it3)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)


def test_tokens_in_range_and_termination():
    # Deep-ish, recursion-heavy grammar: depth limit must bound every sentence.
    cfg = PCFGConfig(vocab_size=64, n_classes=8, n_nonterminals=6, rules_per_symbol=3,
                     rule_length=3, max_depth=4, p_nonterminal=1.0, seed=2)
    g = ZipfPCFG(cfg)
    assert g.max_sentence_length == 3 ** 4
    # Every nonterminal has an all-terminal rule.
    for rules in g.rules:
        assert any(all(s >= cfg.n_nonterminals for s in r) for r in rules)
    t = g.sample_tokens(50_000, 0.5, _gen(0))
    assert int(t.min()) >= 0 and int(t.max()) <= cfg.vocab_size == g.sep
    sents = _sentences(t, g.sep)
    assert len(sents) > 100
    lengths = [len(s) for s in sents]
    assert min(lengths) >= 1 and max(lengths) <= g.max_sentence_length
    # With p_nonterminal=1 the non-terminal rules always recurse: the bound is actually reached
    # near its top (sentences get long), so the depth cap is what stops them.
    assert max(lengths) > 3 ** 3


def test_default_grammar_range(grammar, streams):
    for t in streams.values():
        assert t.shape == (N_TOK,) and t.dtype == torch.long
        assert int(t.min()) >= 0 and int(t.max()) <= grammar.sep
        lengths = [len(s) for s in _sentences(t, grammar.sep)]
        assert max(lengths) <= grammar.config.rule_length ** grammar.config.max_depth


def test_emission_imbalance_grows_with_alpha(grammar, streams):
    st = [grammar.stats(streams[a]) for a in (0.0, 0.5, 1.0, 1.5)]
    top = [s["top10_mass"] for s in st]
    slope = [-s["zipf_slope"] for s in st]
    ent = [s["unigram_entropy"] for s in st]
    assert all(b > a + 0.02 for a, b in zip(top, top[1:])), top
    assert all(b > a + 0.05 for a, b in zip(slope, slope[1:])), slope
    assert all(b < a for a, b in zip(ent, ent[1:])), ent
    # Coupled streams: same class sequence, so the same separators / sentence structure.
    sep = grammar.sep
    assert torch.equal(streams[0.0] == sep, streams[1.5] == sep)
    K = grammar.class_size
    nonsep = streams[0.0] != sep
    assert torch.equal(streams[0.0][nonsep] // K, streams[1.5][nonsep] // K)


def test_alpha0_uniform_within_class(grammar, streams):
    t = streams[0.0]
    t = t[t != grammar.sep]
    K, C = grammar.class_size, grammar.config.n_classes
    counts = torch.bincount(t, minlength=C * K).view(C, K).double()
    n_c = counts.sum(1, keepdim=True)
    used = (n_c.squeeze(1) >= 5 * K)
    assert used.sum() >= C // 2
    expected = n_c[used] / K
    chi2 = float(((counts[used] - expected) ** 2 / expected).sum())
    df = int(used.sum()) * (K - 1)
    # Chi-square with df degrees of freedom: mean df, sd sqrt(2 df); allow 5 sd.
    assert chi2 < df + 5 * math.sqrt(2 * df), (chi2, df)
    # Max relative deviation, on classes with >= 2000 draws (>= 125 per token): tolerance 35%.
    big = n_c.squeeze(1) >= 2000
    rel = (counts[big] / (n_c[big] / K) - 1).abs().max()
    assert float(rel) < 0.35, float(rel)
    # At alpha=1.5 the same test fails decisively.
    t15 = streams[1.5]
    t15 = t15[t15 != grammar.sep]
    c15 = torch.bincount(t15, minlength=C * K).view(C, K).double()[used]
    e15 = c15.sum(1, keepdim=True) / K
    assert float(((c15 - e15) ** 2 / e15).sum()) > 10 * (df + 5 * math.sqrt(2 * df))


def test_batches_shapes_and_shift(grammar):
    B, T = 3, 17
    it = grammar.batches(B, T, emission_alpha=1.0, seed=11)
    flat = []
    for _ in range(5):
        x, y = next(it)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert int(x.min()) >= 0 and int(y.max()) <= grammar.sep
        flat.append(torch.cat([x, y[:, -1:]], 1))
    # Windows are consecutive cuts of one continuous stream of whole sentences.
    stream = torch.cat(flat).reshape(-1)
    ref = grammar.sample_sentences_stream(1 << 16, 1.0, torch.Generator().manual_seed(11))
    assert torch.equal(stream, ref[: stream.numel()])
    # Crossing a chunk boundary keeps working.
    it = grammar.batches(2, 50, 0.0, seed=1, chunk_tokens=64)
    for _ in range(10):
        x, y = next(it)
        assert x.shape == (2, 50) and torch.equal(x[:, 1:], y[:, :-1])


def test_rule_alpha_changes_structure():
    base = PCFGConfig(seed=0, rule_alpha=0.0)
    g0 = ZipfPCFG(base)
    g2 = ZipfPCFG(PCFGConfig(seed=0, rule_alpha=2.0))
    R = base.rules_per_symbol
    # Rule distributions: uniform at 0, Zipf-concentrated at 2.
    assert np.allclose(g0.rule_probs, 1.0 / R)
    h2 = -(g2.rule_probs * np.log(g2.rule_probs)).sum(1)
    assert np.all(h2 < math.log(R) - 0.3)
    s0 = g0.sample_tokens(N_TOK // 2, 0.0, _gen(1))
    s2 = g2.sample_tokens(N_TOK // 2, 0.0, _gen(1))
    st0, st2 = g0.stats(s0), g2.stats(s2)
    # Same structure, different rule probabilities -> different sentence statistics.
    assert abs(st0["mean_sentence_length"] - st2["mean_sentence_length"]) > 1.0, (st0, st2)
    K, C = g0.class_size, base.n_classes

    def class_hist(t):
        t = t[t != g0.sep]
        return torch.bincount(t // K, minlength=C).double() / t.numel()

    tv = 0.5 * float((class_hist(s0) - class_hist(s2)).abs().sum())
    assert tv > 0.05, tv


def test_stats_hand_made():
    # Terminals 0..3, separator 4. Sentences [1,1,2] and [3,1]; trailing [2] is unterminated.
    t = torch.tensor([1, 1, 2, 4, 3, 1, 4, 2])
    s = stats(t, separator=4, vocab_size=4)
    assert s["n_tokens"] == 8
    assert s["n_sentences"] == 2
    assert s["mean_sentence_length"] == pytest.approx(2.5)
    # Terminal counts: 1 -> 3, 2 -> 2, 3 -> 1 (of 6).
    p = np.array([3, 2, 1]) / 6
    assert s["unigram_entropy"] == pytest.approx(float(-(p * np.log(p)).sum()))
    assert s["top10_mass"] == pytest.approx(0.5)  # ceil(0.4) = 1 token
    x, y = np.log([1, 2, 3]), np.log([3, 2, 1])
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    assert s["zipf_slope"] == pytest.approx(slope)
    # Exact power law: slope recovered; default separator = max token; leading separator ignored.
    counts = [144, 36, 16, 9]  # = 144 * rank^-2
    toks = [9] + sum(([i] * c for i, c in enumerate(counts)), []) + [9]
    s = stats(toks)
    assert s["zipf_slope"] == pytest.approx(-2.0)
    assert s["n_sentences"] == 1 and s["mean_sentence_length"] == 205
    assert s["top10_mass"] == pytest.approx(144 / 205)
    # Grammar method uses its own separator.
    g = ZipfPCFG(PCFGConfig(vocab_size=4, n_classes=2, seed=0))
    assert g.stats(t) == stats(t, separator=4, vocab_size=4)


def test_config_validation():
    with pytest.raises(ValueError):
        PCFGConfig(vocab_size=100, n_classes=16)
    with pytest.raises(ValueError):
        PCFGConfig(rule_alpha=-1.0)
    with pytest.raises(ValueError):
        ZipfPCFG(PCFGConfig()).sample_tokens(10, -0.5, _gen(0))
    for bad in (math.nan, math.inf):  # NaN passed every "< 0" check and gave a one-token language
        with pytest.raises(ValueError, match="emission_alpha must be finite"):
            ZipfPCFG(PCFGConfig()).sample_tokens(10, bad, _gen(0))
    for field in ("rule_alpha", "emission_alpha"):
        for bad in (math.nan, math.inf):  # an infinite exponent puts all mass on rank 1
            with pytest.raises(ValueError, match="Zipf exponents must be finite"):
                PCFGConfig(**{field: bad})
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        next(ZipfPCFG(PCFGConfig()).batches(0, 4))
    with pytest.raises(ValueError, match="context must be an int >= 1"):
        next(ZipfPCFG(PCFGConfig()).batches(2, -1))


def test_speed(grammar):
    import time
    t0 = time.perf_counter()
    grammar.sample_tokens(N_TOK, 1.0, _gen(0))
    assert time.perf_counter() - t0 < 3.0


def test_zipf_exponent_recovered(grammar, streams):
    """Within a class, the token of rank r is emitted with probability ∝ r^(-alpha): pooling the counts
    of every class by within-class rank and fitting log count against log rank recovers alpha."""
    K = grammar.class_size
    rank_of = np.empty(grammar.config.vocab_size, dtype=np.int64)
    for c in range(grammar.config.n_classes):
        rank_of[c * K + grammar.within_perm[c]] = np.arange(1, K + 1)
    for alpha, t in streams.items():
        t = t[t != grammar.sep].numpy()
        counts = np.bincount(rank_of[t], minlength=K + 1)[1:].astype(np.float64)
        slope = np.polyfit(np.log(np.arange(1, K + 1)), np.log(counts), 1)[0]
        assert -slope == pytest.approx(alpha, abs=0.04), (alpha, slope)
