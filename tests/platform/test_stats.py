"""Bootstrap intervals against normal theory, the delta method and hand-computed aggregates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from retro.platform.stats import Aggregate, interval, paired_difference

Z = 1.959964  # the standard normal's 97.5% quantile


def test_mean_interval_matches_normal_theory():
    x = np.random.default_rng(1).normal(3.0, 2.0, 400)
    est = interval(x)
    half = Z * x.std() / math.sqrt(len(x))          # 1.96 sigma / sqrt(n)
    assert est.value == pytest.approx(x.mean())
    assert est.n == 400
    assert (est.hi - est.lo) == pytest.approx(2 * half, rel=0.05)
    assert (est.lo + est.hi) / 2 == pytest.approx(x.mean(), abs=0.1 * half)


def test_paired_interval_uses_the_spread_of_the_differences():
    rng = np.random.default_rng(2)
    n = 300
    shared = rng.normal(0.0, 3.0, n)                 # item difficulty both models see
    a = shared + 0.3 + rng.normal(0.0, 0.5, n)
    b = shared + rng.normal(0.0, 0.5, n)
    paired = paired_difference(a, b)
    unpaired = paired_difference(a, b, paired=False)
    assert paired.delta == pytest.approx(a.mean() - b.mean())
    assert (paired.hi - paired.lo) == pytest.approx(
        2 * Z * (a - b).std() / math.sqrt(n), rel=0.07)
    assert (unpaired.hi - unpaired.lo) == pytest.approx(
        2 * Z * math.sqrt(a.var() + b.var()) / math.sqrt(n), rel=0.07)
    # the 0.3 shift is clear when paired, lost in the item spread when not
    assert not paired.within_noise and paired.lo > 0
    assert unpaired.within_noise


def test_no_difference_is_within_noise():
    x = np.random.default_rng(3).normal(10.0, 1.0, 200)
    y = x[::-1].copy()                   # the same scores on other items: equal means
    d = paired_difference(x, y)
    assert d.delta == pytest.approx(0.0, abs=1e-12)
    assert d.lo < 0 < d.hi and d.within_noise
    assert d.hi - d.lo > 0.1             # a real interval, not a degenerate one


def test_perplexity_pools_nll_over_tokens():
    # sequence 1: 10 tokens, NLL 10 (ppl e^1); sequence 2: 20 tokens, NLL 60 (ppl e^3)
    est = interval([10.0, 60.0], [10.0, 20.0], Aggregate("exp-ratio"), resamples=200)
    assert est.value == pytest.approx(math.exp(70 / 30))          # 10.31, not (e + e^3)/2
    assert est.value != pytest.approx((math.e + math.e ** 3) / 2)
    bpb = interval([10.0, 60.0], [8.0, 22.0], Aggregate("ratio", 1 / math.log(2)),
                   resamples=200)
    assert bpb.value == pytest.approx(70 / 30 / math.log(2))


def test_ratio_interval_matches_the_delta_method():
    rng = np.random.default_rng(4)
    n = 500
    tokens = rng.integers(50, 300, n).astype(float)
    nll = 2.0 * tokens + rng.normal(0, 1, n) * np.sqrt(tokens) * 3
    est = interval(nll, tokens, Aggregate("exp-ratio"))
    r = nll.sum() / tokens.sum()
    # Var(sum y / sum x) ~ mean((y - r x)^2) / (n mean(x)^2)
    se = math.sqrt(np.mean((nll - r * tokens) ** 2) / n) / tokens.mean()
    assert est.value == pytest.approx(math.exp(r))
    assert math.log(est.hi) - math.log(est.lo) == pytest.approx(2 * Z * se, rel=0.07)


def test_relative_difference_and_seeded_replicates():
    rng = np.random.default_rng(5)
    tokens = np.full(100, 64.0)
    a = rng.normal(3.0, 0.2, 100) * 64
    b = a + rng.normal(0.05, 0.1, 100) * 64          # b is worse by ~0.05 nats/token
    d = paired_difference(a, b, tokens, tokens, Aggregate("exp-ratio"))
    assert d.rel == pytest.approx(math.exp((a.sum() - b.sum()) / tokens.sum()) - 1)
    assert d.rel_lo < d.rel < d.rel_hi < 0 and d.hi < 0
    again = paired_difference(a, b, tokens, tokens, Aggregate("exp-ratio"))
    other = paired_difference(a, b, tokens, tokens, Aggregate("exp-ratio"), seed=9)
    assert (again.lo, again.hi) == (d.lo, d.hi)
    assert (other.lo, other.hi) != (d.lo, d.hi)


def test_paired_needs_equal_lengths():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0, 2.0], [1.0])
