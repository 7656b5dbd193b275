"""The `neighbours` stage and `Neighbours`: k DB chunks for every chunk of every sequence.

For sequence i, chunk j (tokens [j*m, (j+1)*m), EOD dropped when detokenizing) we search
`candidates` hits, drop every hit whose document is ANY document of sequence i (the whole
sample, as Megatron's `query.py` does), keep the first k and pad with -1. Shards are
window-aligned sequence ranges, so results are identical for any number of shards.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from retro.components.retrieval.chunk_reuse import DBChunkLookup, query_chunk_array, \
    reusable_embeddings, search_reusing
from retro.components.retrieval.chunking import ChunkDB, decode_batch, raw_tokenizer
from retro.components.retrieval.common import (artifact_path, done_marker, read_meta, run_shards,
                                              shard_count, shard_ranges, windows, write_meta)
from retro.components.retrieval.search import build_searcher
from retro.components.retrieval.sequences import Sequences
from retro.components.retrieval.retrievers import NeighboursConfig
from retro.platform.spec.node import NodeFields
from retro.platform.stage import Slot, StageContext, StageParams, stage
from retro.platform.store import open_memmap
from retro.platform.timing import merge
from retro.components.precision import precision_info, report_shard_precision

_SEQ_CHUNKS_PER_SHARD = 32_768


class NeighboursParams(StageParams):
    neighbours: NeighboursConfig
    """Candidates searched and neighbours kept per chunk."""
    retriever: NodeFields("retriever", "embedder", "index", "stopwords")
    """What searching needs: the encoder and index (dense) or the stopwords (bm25)."""


def searcher_node(params: dict) -> dict:
    """The retriever node a searcher needs, from the stage params (JSON form)."""
    return params["retriever"]


@stage("neighbours", version="2", params=NeighboursParams,
       inputs={"sequences": "one split's sequences (sequences)",
               "chunk_db": "the chunk table (chunk-db)", "tokens": "document tokens (tokenize)",
               "tokenizer": "the decoder tokenizer (tokenizer)",
               "index": Slot("the filled index, dense retrievers (fill-index)", optional=True),
               "bm25": Slot("the BM25 index, bm25 retrievers (bm25-index)", optional=True),
               "embeddings": Slot("the DB embeddings, dense (embed): a query chunk equal to a "
                                  "DB chunk reuses its vector", optional=True)},
       estimate=lambda p: {"k": p.neighbours.k, "candidates": p.neighbours.candidates,
                           **precision_info(p, "retriever", "embedder")})
def neighbours(ctx: StageContext[NeighboursParams]) -> dict:
    """Neighbour ids for one split's sequences.

    Params: `neighbours` {candidates, k}, `retriever_type` (dense/bm25), and `embedder` + `index`
    (dense) or `stopwords` (bm25). Inputs: `sequences`, `chunk_db`, `tokens`, `tokenizer`, and
    `index` (fill-index) or `bm25` (bm25-index).
    Files: `neighbours.npy` int64 [n_seq, chunks_per_seq, k] (-1 = none); `scores.npy` float32
    (same shape); `meta.json`.
    """
    k = ctx.params.neighbours.k
    params = ctx.params.model_dump(mode="json")     # shipped to shard workers
    seqs = Sequences(ctx.inputs["sequences"].path)
    m = read_meta(ctx.inputs["chunk_db"].path)["chunk_length"]
    cps = math.ceil(seqs.seq_length / m)
    searcher = build_searcher(searcher_node(params), ctx.inputs, ctx.log)  # checks dims
    window = max(1, searcher.window // cps)
    del searcher
    ids_path, scores_path = ctx.work_dir / "neighbours.npy", ctx.work_dir / "scores.npy"
    shape = (len(seqs), cps, k)
    if not (ids_path.exists() and scores_path.exists()
            and open_memmap(ids_path).shape == shape):
        open_memmap(ids_path, np.int64, shape, mode="w+").flush()
        open_memmap(scores_path, np.float32, shape, mode="w+").flush()
    n_shards = shard_count(ctx, len(seqs) * cps, _SEQ_CHUNKS_PER_SHARD)
    ranges = shard_ranges(len(seqs), n_shards, window)
    inputs = {slot: str(a.path) for slot, a in ctx.inputs.items()}
    jobs = [{"params": params, "inputs": inputs, "a": a, "b": b, "window": window,
             "chunk_length": m, "ids": str(ids_path), "scores": str(scores_path)}
            for a, b in ranges]
    stats = run_shards(ctx, _neighbour_shard, jobs, [b - a for a, b in ranges],
                       f"neighbours {seqs.split} sequences")
    os.replace(ids_path, ctx.out_dir / "neighbours.npy")
    os.replace(scores_path, ctx.out_dir / "scores.npy")
    write_meta(ctx.out_dir, split=seqs.split, k=k, chunk_length=m, chunks_per_seq=cps,
               n_seq=len(seqs))
    queries = len(seqs) * cps
    padded = sum(s["padded"] for s in stats) / max(queries * k, 1)
    if padded > 0.1:
        ctx.log.warning("%.0f%% of neighbour slots are -1: most of the %d candidates came from "
                        "the sequence's own documents; raise retriever.neighbours.candidates",
                        100 * padded, ctx.params.neighbours.candidates)
    ctx.add_times(merge(*(s.get("time_s") for s in stats)))
    report_shard_precision(ctx, stats)          # a dense retriever's query encoder
    return {"n_seq": len(seqs), "queries": queries,
            "excluded_same_doc": sum(s["excluded"] for s in stats) / max(queries, 1),
            "reused_db_embeddings": sum(s.get("reused", 0) for s in stats) / max(queries, 1),
            "padded_fraction": padded}


def _neighbour_shard(job: dict) -> dict:
    """Search sequences [a, b) and write their rows; returns filter statistics."""
    marker = done_marker(Path(job["ids"]).parent, f"nbr-{job['a']:012d}")
    if marker.exists():
        return {"excluded": 0, "padded": 0, "reused": 0}
    p, inputs, m = job["params"], job["inputs"], job["chunk_length"]
    k, candidates = int(p["neighbours"]["k"]), int(p["neighbours"]["candidates"])
    seqs = Sequences(inputs["sequences"])
    db = ChunkDB(inputs["chunk_db"], inputs["tokens"])
    decoder = raw_tokenizer(inputs["tokenizer"])
    searcher = build_searcher(searcher_node(p), inputs)
    n = min(candidates, searcher.ntotal)
    ids_out, scores_out = open_memmap(job["ids"], mode="r+"), open_memmap(job["scores"], mode="r+")
    cps = ids_out.shape[1]
    excluded = padded = reused = 0
    reuse = _db_chunk_reuse(inputs, db, seqs.eod_id)
    for a, b in windows(job["a"], job["b"], job["window"]):
        tokens = np.asarray(seqs.tokens[a:b], dtype=np.int64)
        chunks = [row[j * m:(j + 1) * m].tolist() for row in tokens for j in range(cps)]
        texts = decode_batch(decoder, chunks)
        if reuse is None:
            scores, hits = searcher.search_texts(texts, n)
        else:  # chunks that are DB chunks: the embed stage's vectors, not a second forward
            scores, hits, found = search_reusing(
                searcher, texts, query_chunk_array(chunks, m, seqs.eod_id), *reuse, n)
            reused += found
        hit_docs = db.doc_of(hits).reshape(b - a, cps, n)
        hits, scores = hits.reshape(b - a, cps, n), scores.reshape(b - a, cps, n)
        for i in range(b - a):
            banned = np.isin(hit_docs[i], seqs.docs(a + i)) & (hits[i] >= 0)
            excluded += int(banned.sum())
            keep_ids, keep_scores = _first_k(hits[i], scores[i], ~banned & (hits[i] >= 0), k)
            padded += int((keep_ids < 0).sum())
            ids_out[a + i], scores_out[a + i] = keep_ids, keep_scores
    ids_out.flush()
    scores_out.flush()
    marker.touch()
    return {"excluded": excluded, "padded": padded, "reused": reused,
            "time_s": searcher.times.as_dict(),
            **searcher.precision_report()}


def _db_chunk_reuse(inputs: dict, db: ChunkDB, eod: int):
    """(lookup, DB embeddings) when the stage has an `embeddings` input it can reuse, else None
    (bm25, no input, or float16 storage)."""
    if "embeddings" not in inputs:
        return None
    emb = reusable_embeddings(inputs["embeddings"])
    return None if emb is None else (DBChunkLookup(db, eod), emb)


def _first_k(ids: np.ndarray, scores: np.ndarray, ok: np.ndarray, k: int):
    """Per row: the first k hits where `ok`, in rank order, padded with -1 / nan."""
    rank = np.cumsum(ok, axis=1) - 1                     # position among kept hits
    take = ok & (rank < k)
    out_ids = np.full((ids.shape[0], k), -1, dtype=np.int64)
    out_scores = np.full((ids.shape[0], k), np.nan, dtype=np.float32)
    r, c = np.nonzero(take)
    out_ids[r, rank[r, c]] = ids[r, c]
    out_scores[r, rank[r, c]] = scores[r, c]
    return out_ids, out_scores



class Neighbours:
    """Reader of a `neighbours` artifact: `.ids` memmap [n_seq, chunks_per_seq, k]."""

    def __init__(self, artifact_path_: Any):
        self.path = artifact_path(artifact_path_)
        meta = read_meta(self.path)
        self.k: int = meta["k"]
        self.chunk_length: int = meta["chunk_length"]
        self.split: str = meta["split"]
        self.ids = open_memmap(self.path / "neighbours.npy")
        self.scores = open_memmap(self.path / "scores.npy")
