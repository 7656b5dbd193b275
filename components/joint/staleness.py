"""Index staleness: how far the index built from an old document-encoder snapshot has drifted.

Staleness recall@k (issue 17, point 3): for each probe query (embedded with the *current* query
encoder), the top-k documents by exact search over the stale document embeddings against the
top-k by exact search over fresh embeddings from the *current* document encoder; the metric is
|stale top-k ∩ fresh top-k| / k averaged over the probes. 1.0 means the stale index retrieves
exactly what a refresh would; it measures embedding drift only (both searches are exact, so an
approximate faiss index's own error is not mixed in).

Re-embedding the whole corpus at every check would cost a refresh, so `StalenessProbe` fixes a
probe document subset (the probes' gold passages plus a seeded random sample) and measures the
recall within it: exact for that subset, a few hundred to a thousand documents per check.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from retro.components.joint.live_index import IndexSnapshot

Encoder = Callable[[list[str]], np.ndarray]
"""texts -> float32 [n, dim] embeddings (e.g. `QueryEncoder.encode`)."""


def exact_topk(q: np.ndarray, docs: np.ndarray, k: int, metric: str = "ip") -> np.ndarray:
    """Ids [n_q, k] of the k best documents per query, best first; ties go to the lower id."""
    q = np.asarray(q, dtype=np.float32)
    docs = np.asarray(docs, dtype=np.float32)
    if metric == "ip":
        score = q @ docs.T
    elif metric == "l2":
        score = -(np.sum(q * q, 1)[:, None] - 2 * q @ docs.T + np.sum(docs * docs, 1)[None, :])
    else:
        raise ValueError(f"metric {metric!r}: use 'ip' or 'l2'")
    k = min(k, docs.shape[0])
    return np.argsort(-score, axis=1, kind="stable")[:, :k]


def staleness_recall(stale: Union[IndexSnapshot, np.ndarray], fresh_doc_emb: np.ndarray,
                     probe_q: np.ndarray, k: int, metric: str = "ip",
                     doc_ids: Optional[Sequence[int]] = None) -> float:
    """recall@k of search over the stale document embeddings against exact search over fresh
    ones: mean over probe queries of |stale top-k ∩ fresh top-k| / k.

    Args:
        stale: the stale snapshot (its `embeddings.npy`) or the stale embeddings themselves.
        fresh_doc_emb: the same documents embedded with the current document encoder; with
            `doc_ids`, only those documents, in that order.
        probe_q: probe queries [n_q, dim] embedded with the current query encoder.
        k: recall@k (capped at the number of documents).
        doc_ids: restrict the stale embeddings to these rows (a probe subset).
    """
    stale_emb = stale.embeddings() if isinstance(stale, IndexSnapshot) else stale
    if doc_ids is not None:
        stale_emb = np.asarray(stale_emb)[np.asarray(doc_ids, dtype=np.int64)]
    if np.shape(stale_emb) != np.shape(fresh_doc_emb):
        raise ValueError(f"stale embeddings {np.shape(stale_emb)} and fresh "
                         f"{np.shape(fresh_doc_emb)} must describe the same documents")
    if len(probe_q) == 0:
        raise ValueError("no probe queries")
    a = exact_topk(probe_q, stale_emb, k, metric)
    b = exact_topk(probe_q, fresh_doc_emb, k, metric)
    kk = a.shape[1]
    hits = [len(np.intersect1d(x, y, assume_unique=True)) for x, y in zip(a, b)]
    return float(np.mean(hits) / kk)


def probe_doc_ids(n_docs: int, size: int, gold: Sequence[int] = (), seed: int = 0) -> np.ndarray:
    """The fixed probe documents: every gold id (deduplicated, first `size`), then a seeded
    random sample of the others up to `size`; sorted."""
    size = min(size, n_docs)
    gold_ids = list(dict.fromkeys(int(g) for g in gold if 0 <= int(g) < n_docs))[:size]
    rest = np.setdiff1d(np.arange(n_docs), np.asarray(gold_ids, dtype=np.int64))
    extra = np.random.default_rng(seed).choice(rest, size - len(gold_ids), replace=False) \
        if size > len(gold_ids) else np.zeros(0, np.int64)
    return np.sort(np.concatenate([np.asarray(gold_ids, np.int64), extra.astype(np.int64)]))


class StalenessProbe:
    """A fixed probe set (queries + document subset) measured at every staleness check.

    Args:
        query_texts: the probe queries.
        doc_ids: ids of the probe documents in the corpus (rows of the stale embeddings).
        doc_texts: their texts, same order.
        k: recall@k.
        metric: `ip` or `l2`, as the index.
    """

    def __init__(self, query_texts: Sequence[str], doc_ids: Sequence[int],
                 doc_texts: Sequence[str], k: int = 10, metric: str = "ip"):
        if len(doc_ids) != len(doc_texts):
            raise ValueError("doc_ids and doc_texts must have the same length")
        self.query_texts = list(query_texts)
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.doc_texts = list(doc_texts)
        self.k, self.metric = k, metric
        self.last_seconds: Optional[float] = None

    @classmethod
    def build(cls, questions: Sequence[str], corpus: Sequence[str], cfg: Any,
              gold: Optional[Sequence[Sequence[int]]] = None, seed: int = 0,
              metric: str = "ip") -> "StalenessProbe":
        """Probe set from a `RefreshConfig` (`probe_queries`, `probe_docs`, `probe_k`): a seeded
        sample of `questions` (`gold[i]`: corpus ids of question i's gold passages, included in
        the document subset) and `probe_docs` documents of `corpus`."""
        rng = np.random.default_rng(seed)
        qi = np.sort(rng.permutation(len(questions))[:cfg.probe_queries])
        gold_ids = [g for i in qi for g in (gold[i] if gold is not None else ())]
        ids = probe_doc_ids(len(corpus), cfg.probe_docs, gold_ids, seed)
        return cls([questions[i] for i in qi], ids, [corpus[i] for i in ids], cfg.probe_k,
                   metric)

    def measure(self, query_enc: Encoder, doc_enc: Encoder,
                stale: Union[IndexSnapshot, np.ndarray]) -> float:
        """Staleness recall@k of `stale` (a snapshot or full stale embeddings) under the current
        encoders; `last_seconds` records the cost of the check."""
        t0 = time.perf_counter()
        q = np.asarray(query_enc(self.query_texts), dtype=np.float32)
        fresh = np.asarray(doc_enc(self.doc_texts), dtype=np.float32)
        r = staleness_recall(stale, fresh, q, self.k, self.metric, doc_ids=self.doc_ids)
        self.last_seconds = time.perf_counter() - t0
        return r
