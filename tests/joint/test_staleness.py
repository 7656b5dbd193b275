"""Staleness recall@k (issue 17, point 3) on constructed cases computed by hand.

The document encoder of the main case is linear on one-hot document features: W = I gives the
stale embeddings e_0..e_3; the perturbed encoder scales document 1's vector by s. With the probe
queries q1 = (4,3,2,1), q2 = (1,2,3,4), q3 = (1,4,2,3) and k = 2 the stale top-2 sets are
{0,1}, {2,3}, {1,3}. Fresh scores put document 1 at 3s, 2s, 4s against documents 0/2/3 at
(4,2,1), (1,3,4), (1,2,3), so document 1 stays in q1's top-2 iff 3s > 2, in q3's iff 4s > 2, and
q2 never changes (2s < 3):
  s = 0.1: (1/2 + 1 + 1/2) / 3 = 2/3;  s = 0.6: (1/2 + 1 + 1) / 3 = 5/6;  s = 0.7 or 1: 1.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from retro.components.joint.live_index import IndexSnapshot
from retro.components.joint.refresh_config import RefreshConfig
from retro.components.joint.staleness import (StalenessProbe, exact_topk, probe_doc_ids,
                                              staleness_recall)

QUERIES = {"q1": [4, 3, 2, 1], "q2": [1, 2, 3, 4], "q3": [1, 4, 2, 3]}
DOCS = ["d0", "d1", "d2", "d3"]


def _query_enc(texts):
    return np.array([QUERIES[t] for t in texts], np.float32)


def _doc_enc(scale_doc1: float):
    w = np.eye(4, dtype=np.float32)
    w[1, 1] = scale_doc1                                   # the known perturbation

    def enc(texts):
        return w[[int(t[1:]) for t in texts]]
    return enc


@pytest.mark.parametrize("s, expected", [(1.0, 1.0), (0.7, 1.0), (0.6, 5 / 6), (0.1, 2 / 3)])
def test_perturbed_document_encoder_gives_the_hand_computed_recall(s, expected):
    probe = StalenessProbe(list(QUERIES), [0, 1, 2, 3], DOCS, k=2)
    stale = np.eye(4, dtype=np.float32)                    # embedded by the unperturbed encoder
    assert probe.measure(_query_enc, _doc_enc(s), stale) == pytest.approx(expected, abs=1e-12)
    assert probe.last_seconds is not None and probe.last_seconds >= 0


def test_l2_metric_hand_case():
    # Docs on a line at x = 0, 1, 2, 3; the query at x = 0.4: stale top-2 {0, 1}. Moving doc 0
    # to x = 2.5 (distance 2.1) lets doc 2 (distance 1.6) in: recall 1/2.
    stale = np.array([[0, 0], [1, 0], [2, 0], [3, 0]], np.float32)
    fresh = stale.copy()
    fresh[0, 0] = 2.5
    q = np.array([[0.4, 0]], np.float32)
    assert staleness_recall(stale, fresh, q, 2, metric="l2") == 0.5
    # k = 1: by L2 the nearest moves from doc 0 to doc 1 (recall 0); by inner product the best
    # is doc 3 (score 1.2) before and after (recall 1).
    assert staleness_recall(stale, fresh, q, 1, metric="l2") == 0.0
    assert staleness_recall(stale, fresh, q, 1, metric="ip") == 1.0


def test_probe_subset_of_a_snapshot_ignores_documents_outside_it(tmp_path):
    # Corpus of 6 one-hot documents; the probe subset is documents 0-3. Documents 4 and 5 would
    # top every query on the full corpus (weight 9) but are not in the subset, so the recall is
    # the 4-document case above at s = 0.1: 2/3.
    digest = "a" * 64
    (tmp_path / digest).mkdir()
    np.save(tmp_path / digest / "embeddings.npy", np.eye(6, dtype=np.float32))
    (tmp_path / digest / "meta.json").write_text(json.dumps({"step": 4}))
    snap = IndexSnapshot.open(tmp_path, digest)
    queries = {k: v + [9, 9] for k, v in QUERIES.items()}
    probe = StalenessProbe(list(queries), [0, 1, 2, 3], DOCS, k=2)
    small = _doc_enc(0.1)
    r = probe.measure(lambda t: np.array([queries[x] for x in t], np.float32),
                      lambda t: np.pad(small(t), ((0, 0), (0, 2))), snap)
    assert r == pytest.approx(2 / 3)


def test_ties_go_to_the_lower_id_and_k_is_capped():
    docs = np.array([[1, 0], [1, 0], [0, 1]], np.float32)   # docs 0 and 1 identical
    assert exact_topk(np.array([[1, 0]], np.float32), docs, 1).tolist() == [[0]]
    assert exact_topk(np.array([[1, 0]], np.float32), docs, 10).shape == (1, 3)
    # k above the corpus size: every document on both sides, recall 1 whatever the drift.
    assert staleness_recall(docs, -docs, np.array([[1, 0]], np.float32), 10) == 1.0


def test_mismatched_documents_are_an_error():
    with pytest.raises(ValueError, match="same documents"):
        staleness_recall(np.eye(4), np.eye(3), np.ones((1, 4)), 2)


def test_probe_set_is_fixed_seeded_and_holds_the_gold_passages():
    ids = probe_doc_ids(1000, 50, gold=[7, 7, 999, 3], seed=5)
    assert len(ids) == 50 and len(set(ids.tolist())) == 50 and {3, 7, 999} <= set(ids.tolist())
    assert ids.tolist() == sorted(ids.tolist())
    assert ids.tolist() == probe_doc_ids(1000, 50, gold=[7, 7, 999, 3], seed=5).tolist()
    assert probe_doc_ids(10, 50).tolist() == list(range(10))           # capped at the corpus
    cfg = RefreshConfig(probe_queries=3, probe_docs=8, probe_k=2)
    questions = [f"question {i}" for i in range(20)]
    corpus = [f"passage {i}" for i in range(100)]
    gold = [[i * 5] for i in range(20)]
    probe = StalenessProbe.build(questions, corpus, cfg, gold=gold, seed=1)
    assert len(probe.query_texts) == 3 and len(probe.doc_ids) == 8 and probe.k == 2
    chosen = [questions.index(q) for q in probe.query_texts]
    assert {gold[i][0] for i in chosen} <= set(probe.doc_ids.tolist())
    assert probe.doc_texts == [corpus[i] for i in probe.doc_ids]
