"""The `retrieval-quality` stage: recall@k of the filled index against exact search.

A seeded probe of DB chunk embeddings is searched twice: exactly (brute force over the
embeddings memmap, block by block, so memory stays flat) and with the configured index and its
query parameters. recall@k = |approx top-k ∩ exact top-k| / k, averaged over the probe. When
`quality.min_recall` is set and not met, the stage fails, which blocks every stage after it.
"""

from __future__ import annotations

import time

import numpy as np

from retro.components.retrieval.common import build_component, write_meta
from retro.components.retrieval.faiss_index import FILLED
from retro.components.retrieval.retrievers import QualityConfig
from retro.platform.errors import UserError
from retro.platform.spec.node import Node
from retro.platform.stage import StageContext, StageParams, stage
from retro.platform.store import open_memmap

_EXACT_BLOCK = 65_536


def exact_search(emb: np.ndarray, queries: np.ndarray, k: int, metric: str):
    """Exact top-k (scores, ids) of `queries` over the rows of `emb`, streamed in blocks."""
    import faiss

    keep_max = metric == "ip"
    heap = faiss.ResultHeap(len(queries), k, keep_max=keep_max)
    fmetric = faiss.METRIC_INNER_PRODUCT if keep_max else faiss.METRIC_L2
    for a in range(0, len(emb), _EXACT_BLOCK):
        block = np.ascontiguousarray(emb[a:a + _EXACT_BLOCK], dtype=np.float32)
        kk = min(k, len(block))
        scores, ids = faiss.knn(queries, block, kk, metric=fmetric)
        if kk < k:
            pad = ((0, 0), (0, k - kk))
            scores = np.pad(scores, pad, constant_values=-np.inf if keep_max else np.inf)
            ids = np.pad(ids, pad, constant_values=-1)
        heap.add_result(np.ascontiguousarray(scores, dtype=np.float32),
                        np.where(ids >= 0, ids + a, -1).astype(np.int64))
    heap.finalize()
    return heap.D, heap.I


def recall_at(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean over queries of |approx[:, :k] ∩ exact[:, :k]| / k (ids -1 never match)."""
    hits = [len(set(a[:k][a[:k] >= 0]) & set(e[:k])) for a, e in zip(approx, exact)]
    return float(np.mean(hits) / k)


class QualityParams(StageParams):
    index: Node("index")
    """The index node (search settings)."""
    quality: QualityConfig
    """Probe size, cut-offs and the optional minimum recall."""


@stage("retrieval-quality", version="2", params=QualityParams,
       inputs={"embeddings": "DB chunk embeddings (embed)",
               "index": "the filled index (fill-index)"},
       estimate=lambda p: {"min_recall": p.quality.min_recall})
def retrieval_quality(ctx: StageContext[QualityParams]) -> dict:
    """Measure recall@k of the index; fail when below `quality.min_recall`.

    Params: `index` (index node), `quality` (QualityConfig). Inputs: `embeddings`, `index`.
    Files: `quality.json` (also `meta.json`): recall@k for each k, query timings.
    """
    cfg = ctx.params.quality
    spec = build_component("index", ctx.params.index)
    emb = open_memmap(ctx.inputs["embeddings"].path / "embeddings.npy")
    index = spec.read(ctx.inputs["index"].path / FILLED)
    if index.d != emb.shape[1]:
        raise UserError(f"dims mismatch: index d={index.d}, embeddings dim {emb.shape[1]}")
    ks = sorted(set(cfg.recall_at) | {cfg.min_recall_at})
    kmax = min(max(ks), len(emb))
    rows = np.sort(np.random.default_rng(cfg.seed).choice(
        len(emb), min(cfg.probe_size, len(emb)), replace=False))
    queries = np.ascontiguousarray(emb[rows], dtype=np.float32)
    t0 = time.time()
    _, exact = exact_search(emb, queries, kmax, spec.config.metric)
    t_exact = time.time() - t0
    t0 = time.time()
    _, approx = index.search(queries, kmax)
    t_index = time.time() - t0
    result = {f"recall@{k}": recall_at(approx, exact, k) for k in ks if k <= kmax}
    result.update(probe=len(rows), index_qps=len(rows) / max(t_index, 1e-9),
                  exact_qps=len(rows) / max(t_exact, 1e-9), factory=spec.config.factory)
    ctx.log_metrics(step=0, **{k: v for k, v in result.items() if isinstance(v, float)})
    write_meta(ctx.out_dir, **result)
    (ctx.out_dir / "quality.json").write_text((ctx.out_dir / "meta.json").read_text())
    got = result.get(f"recall@{cfg.min_recall_at}")
    if cfg.min_recall is not None and got is not None and got < cfg.min_recall:
        raise UserError(
            f"retrieval quality too low: recall@{cfg.min_recall_at} = {got:.3f} < "
            f"retriever.quality.min_recall = {cfg.min_recall} for index "
            f"{spec.config.factory!r} (nprobe={spec.config.nprobe}, "
            f"ef_search={spec.config.ef_search}); hint: raise nprobe/ef_search, use a finer "
            "index, or lower min_recall")
    return result

