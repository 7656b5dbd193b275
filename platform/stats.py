"""Bootstrap confidence intervals for evaluation aggregates (numpy only).

Every aggregate the report knows is a function of two per-item sums, g(sum(num) / sum(den)):

    mean       num = the item's score, den = 1          g(r) = scale * r     (EM, F1)
    ratio      num = e.g. NLL, den = e.g. bytes         g(r) = scale * r     (bits per byte)
    exp-ratio  num = NLL, den = tokens                  g(r) = exp(r)        (perplexity)

so a perplexity is exp of the pooled NLL per token, never a mean of per-sequence perplexities,
and a resample re-pools the sums of the items drawn. Items (sequences, questions) are the
resampling unit: tokens of one sequence are correlated, so resampling tokens would give
intervals that are too narrow.

`paired_difference` resamples the *same* items for both sides (the two models scored the same
sequences), so the item-to-item variation both share cancels; the unpaired version draws the two
sides independently (for reference, and for tests). Intervals are percentile intervals of
`resamples` bootstrap replicates drawn with a seeded generator, so a report is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np

AggregateKind = Literal["mean", "ratio", "exp-ratio"]
RESAMPLES = 10_000
LEVEL = 0.95
_BLOCK_CELLS = 2_000_000  # resample indices held at once (rows x items), ~16 MB of int64


@dataclass(frozen=True)
class Aggregate:
    """How per-item (num, den) pairs become one number: g(sum(num) / sum(den))."""

    kind: AggregateKind = "mean"
    scale: float = 1.0

    def of_sums(self, num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray | float:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            r = np.divide(num, den)
            return np.exp(r) * self.scale if self.kind == "exp-ratio" else r * self.scale


@dataclass(frozen=True)
class Estimate:
    """One aggregate with its bootstrap interval over `n` items."""

    value: float
    lo: float
    hi: float
    n: int


@dataclass(frozen=True)
class Difference:
    """a - b with its bootstrap interval; `rel` is a / b - 1 (same replicates)."""

    a: float
    b: float
    delta: float
    lo: float
    hi: float
    rel: float
    rel_lo: float
    rel_hi: float
    n: int
    paired: bool

    @property
    def within_noise(self) -> bool:
        """The interval includes 0: no difference at this confidence level."""
        return self.lo <= 0.0 <= self.hi


def interval(num: np.ndarray, den: np.ndarray | None = None, agg: Aggregate = Aggregate(),
             resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Estimate:
    """The aggregate of items (num_i, den_i) and its percentile bootstrap interval."""
    num, den = _columns(num, den)
    value = float(agg.of_sums(num.sum(), den.sum()))
    reps = np.concatenate([agg.of_sums(num[idx].sum(1), den[idx].sum(1))
                           for idx in _index_blocks(len(num), resamples, seed)])
    lo, hi = _percentiles(reps, level)
    return Estimate(value, lo, hi, len(num))


def paired_difference(a_num: np.ndarray, b_num: np.ndarray, a_den: np.ndarray | None = None,
                      b_den: np.ndarray | None = None, agg: Aggregate = Aggregate(),
                      resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL,
                      paired: bool = True) -> Difference:
    """agg(a) - agg(b) with a bootstrap interval.

    Args:
        a_num, b_num: per-item numerators (item i of a and b is the same item when paired).
        a_den, b_den: per-item denominators (None: 1 per item, i.e. a mean).
        agg: the aggregate both sides use.
        paired: resample the same items on both sides (requires equal lengths); False draws
            the two sides independently.
    """
    a_num, a_den = _columns(a_num, a_den)
    b_num, b_den = _columns(b_num, b_den)
    if paired and len(a_num) != len(b_num):
        raise ValueError(f"paired samples need equal lengths ({len(a_num)} vs {len(b_num)})")
    a = float(agg.of_sums(a_num.sum(), a_den.sum()))
    b = float(agg.of_sums(b_num.sum(), b_den.sum()))
    deltas, rels = [], []
    blocks_a = _index_blocks(len(a_num), resamples, seed)
    blocks_b = _index_blocks(len(b_num), resamples, seed + 1) if not paired else None
    for ia in blocks_a:
        ib = ia if blocks_b is None else next(blocks_b)
        ra = agg.of_sums(a_num[ia].sum(1), a_den[ia].sum(1))
        rb = agg.of_sums(b_num[ib].sum(1), b_den[ib].sum(1))
        deltas.append(ra - rb)
        with np.errstate(divide="ignore", invalid="ignore"):
            rels.append(ra / rb - 1.0)
    lo, hi = _percentiles(np.concatenate(deltas), level)
    rel_lo, rel_hi = _percentiles(np.concatenate(rels), level)
    rel = a / b - 1.0 if b else math.nan
    return Difference(a, b, a - b, lo, hi, rel, rel_lo, rel_hi,
                      len(a_num) if paired else min(len(a_num), len(b_num)), paired)


def _columns(num: np.ndarray, den: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    num = np.asarray(num, dtype=np.float64)
    den = np.ones_like(num) if den is None else np.asarray(den, dtype=np.float64)
    if num.ndim != 1 or num.shape != den.shape or len(num) == 0:
        raise ValueError(f"need two equal, non-empty 1-d columns (got {num.shape}, "
                         f"{den.shape})")
    return num, den


def _index_blocks(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Resample indices [rows, n], a block at a time, all from one seeded generator."""
    rng = np.random.default_rng(seed)
    rows = max(1, _BLOCK_CELLS // max(n, 1))
    left = resamples
    while left > 0:
        yield rng.integers(0, n, size=(min(rows, left), n))
        left -= rows


def _percentiles(reps: np.ndarray, level: float) -> tuple[float, float]:
    reps = reps[np.isfinite(reps)]
    if not len(reps):
        return math.nan, math.nan
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(reps, [alpha, 1.0 - alpha])
    return float(lo), float(hi)
