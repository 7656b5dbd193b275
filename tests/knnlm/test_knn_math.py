"""kNN-LM arithmetic against hand computations (Khandelwal et al. 2020, Eq. 2-3)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from retro.components.knnlm import knn


def test_knn_distribution_is_softmax_of_negative_distances_summed_per_value():
    # 3 neighbours at squared distances 1, 2, 4 carrying tokens 5, 5, 2 (vocab 6), T = 1
    d, v = np.array([[1.0, 2.0, 4.0]]), np.array([[5, 5, 2]])
    z = math.exp(-1) + math.exp(-2) + math.exp(-4)
    p = np.exp(knn.knn_log_probs(d, v, vocab=6))[0]
    assert p[5] == pytest.approx((math.exp(-1) + math.exp(-2)) / z, rel=1e-12)
    assert p[2] == pytest.approx(math.exp(-4) / z, rel=1e-12)
    assert p[[0, 1, 3, 4]].sum() == 0
    # temperature 2: exp(-d / 2)
    z2 = math.exp(-0.5) + math.exp(-1) + math.exp(-2)
    p2 = np.exp(knn.knn_log_probs(d, v, vocab=6, temperature=2.0))[0]
    assert p2[2] == pytest.approx(math.exp(-2) / z2, rel=1e-12)
    # the target-only path gives the same numbers
    t = knn.knn_target_log_probs(d, v, np.array([5]))
    assert math.exp(t[0]) == pytest.approx(p[5], rel=1e-12)
    assert knn.knn_target_log_probs(d, v, np.array([3]))[0] == -np.inf


def test_interpolation_lambda_0_is_the_lm_and_lambda_1_the_knn_distribution():
    lm = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    with np.errstate(divide="ignore"):
        kn = np.log(np.array([0.5, 0.5, 0.0, 0.0]))
    assert np.array_equal(knn.interpolate(lm, kn, 0.0), lm)          # exactly the LM
    assert np.array_equal(knn.interpolate(lm, kn, 1.0), kn)          # exactly p_kNN
    mixed = np.exp(knn.interpolate(lm, kn, 0.25))
    assert mixed == pytest.approx(0.25 * np.array([0.5, 0.5, 0, 0])
                                  + 0.75 * np.array([0.1, 0.2, 0.3, 0.4]), rel=1e-12)
    assert mixed.sum() == pytest.approx(1.0)
    # a position whose neighbours were all excluded keeps the LM
    out = knn.interpolate(lm[None], kn[None], 0.5, has_neighbours=np.array([False]))
    assert np.array_equal(out[0], lm)


def test_excluded_neighbours_leave_the_softmax():
    d, v = np.array([[1.0, 2.0]]), np.array([[7, 8]])
    valid = np.array([[False, True]])
    p = np.exp(knn.knn_log_probs(d, v, vocab=9, valid=valid))[0]
    assert p[8] == pytest.approx(1.0) and p[7] == 0


def test_exact_vs_approximate_distances_on_a_tiny_datastore():
    """Recomputed distances are the hand-computed squared L2 whatever the index; a PQ index's
    own distances are approximate (the paper's 16.5 vs 16.06 setting)."""
    import faiss

    from retro.components.knnlm.eval_knn import KnnSearcher

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((512, 8)).astype(np.float32)
    q = rng.standard_normal((3, 8)).astype(np.float32)

    class Store:
        def __init__(self):
            self.keys, self.values, self.docs = keys, np.arange(512) % 5, np.zeros(512, int)

        def __len__(self):
            return 512

    pq = faiss.index_factory(8, "PQ2x4", faiss.METRIC_L2)
    pq.train(keys)
    pq.add(keys)

    class Cfg:
        k, temperature = 4, 1.0
        recompute_distances = True

    exact_d, ids = KnnSearcher(pq, Store(), "l2", Cfg).neighbours(q)
    hand = ((keys[ids] - q[:, None, :]) ** 2).sum(-1)
    assert exact_d == pytest.approx(hand, rel=1e-5)
    Cfg.recompute_distances = False
    approx_d, ids2 = KnnSearcher(pq, Store(), "l2", Cfg).neighbours(q)
    assert np.array_equal(ids, ids2)
    assert not np.allclose(approx_d, hand, rtol=1e-3)               # PQ codes, not the keys
    flat = faiss.IndexFlatL2(8)
    flat.add(keys)
    flat_d, flat_ids = KnnSearcher(flat, Store(), "l2", Cfg).neighbours(q)
    assert flat_d == pytest.approx(((keys[flat_ids] - q[:, None]) ** 2).sum(-1), rel=1e-5)
