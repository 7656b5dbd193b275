"""kNN-LM arithmetic (Khandelwal et al. 2020, Eq. 2-3), in log space as both reference codes do.

    p_kNN(y | x) ∝ Σ_{i ∈ N(x)} 1[v_i = y] · exp(-d(k_i, q(x)) / T)
    p(y | x)     = λ · p_kNN(y | x) + (1 - λ) · p_LM(y | x)

d is squared L2 (the paper's RBF kernel; faiss METRIC_L2 returns squared L2 too) or, for an
inner-product index, the negated inner product. T = 1 in the paper (knn-transformers'
`knn_temp`). The mixture is logaddexp(log(1-λ) + log p_LM, log λ + log p_kNN)
(urvashik/knnlm sequence_scorer.py, knn-transformers `interpolate`); λ = 0 returns log p_LM
exactly and λ = 1 log p_kNN exactly (log 0 = -inf drops the other term). Unlike the reference
codes, a target no neighbour carries gets log p_kNN = -inf (they clamp to -10000), which is the
same number after the mixture for any λ < 1.

Neighbours whose key comes from an excluded document (the evaluated sequence's own
documents) are masked out before the softmax: the same-document exclusion of the rest of the
platform. A position left with no neighbour uses p_LM alone.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np


def exact_distances(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Squared L2 between each query [m, d] and its neighbours' stored keys [m, k, d]."""
    q = np.asarray(queries, dtype=np.float32)[:, None, :]
    return ((np.asarray(keys, dtype=np.float32) - q) ** 2).sum(-1)


def neighbour_weights(dists: np.ndarray, temperature: float,
                      valid: Optional[np.ndarray] = None) -> np.ndarray:
    """log softmax(-d / T) over each row's neighbours [m, k]; invalid ones get -inf (a row with
    none valid is all -inf)."""
    logits = -np.asarray(dists, dtype=np.float64) / temperature
    if valid is not None:
        logits = np.where(valid, logits, -np.inf)
    top = logits.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        lse = np.log(np.exp(logits - top).sum(axis=1, keepdims=True)) + top
    return np.where(np.isfinite(lse), logits - lse, -np.inf)


def knn_log_probs(dists: np.ndarray, values: np.ndarray, vocab: int, temperature: float = 1.0,
                  valid: Optional[np.ndarray] = None) -> np.ndarray:
    """The full log p_kNN [m, vocab] from neighbour distances [m, k] and their values [m, k]."""
    w = np.exp(neighbour_weights(dists, temperature, valid))
    probs = np.zeros((len(w), vocab), dtype=np.float64)
    np.add.at(probs, (np.arange(len(w))[:, None], np.asarray(values)), w)
    with np.errstate(divide="ignore"):
        return np.log(probs)


def knn_target_log_probs(dists: np.ndarray, values: np.ndarray, targets: np.ndarray,
                         temperature: float = 1.0, valid: Optional[np.ndarray] = None
                         ) -> np.ndarray:
    """log p_kNN(target) [m]: the logsumexp of the weights of the neighbours whose value is the
    target (urvashik/knnlm knnlm.py get_knn_log_prob), without the vocabulary-wide scatter."""
    logw = neighbour_weights(dists, temperature, valid)
    hit = np.where(np.asarray(values) == np.asarray(targets)[:, None], logw, -np.inf)
    top = hit.max(axis=1, keepdims=True)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.exp(hit - safe).sum(axis=1)) + safe[:, 0]
    return np.where(np.isfinite(top[:, 0]), out, -np.inf)


def interpolate(lm_logp: Any, knn_logp: Any, lmbda: float,
                has_neighbours: Optional[np.ndarray] = None) -> np.ndarray:
    """log(λ p_kNN + (1-λ) p_LM), elementwise; rows without neighbours keep log p_LM."""
    lm_logp, knn_logp = np.asarray(lm_logp, np.float64), np.asarray(knn_logp, np.float64)
    with np.errstate(divide="ignore"):
        a, b = math.log1p(-lmbda) if lmbda < 1 else -np.inf, \
            math.log(lmbda) if lmbda > 0 else -np.inf
    out = np.logaddexp(lm_logp + a, knn_logp + b)
    if has_neighbours is not None:
        mask = np.asarray(has_neighbours)
        mask = mask.reshape(mask.shape + (1,) * (out.ndim - mask.ndim))
        out = np.where(mask, out, lm_logp)
    return out
