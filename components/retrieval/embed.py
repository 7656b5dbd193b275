"""The `embed` stage: every DB chunk -> one row of a float32/float16 embeddings memmap.

Each chunk is detokenized with the decoder tokenizer and re-tokenized with the encoder's own
tokenizer (Megatron: GPT -> BERT WordPiece). Shards are window-aligned row ranges written in
place into one memmap in the stage's work dir, with a done-marker per shard, so an interrupted
run resumes and the result is identical for any number of shards.
"""

from __future__ import annotations

import os
from pathlib import Path


from retro.components.retrieval.chunking import ChunkDB, raw_tokenizer
from retro.components.retrieval.common import (build_component, done_marker, run_shards,
                                              shard_count, shard_ranges, write_meta)
from retro.components.precision import precision_info, report_shard_precision
from retro.platform.spec.node import Node
from retro.platform.stage import StageContext, StageParams, stage
from retro.platform.store import open_memmap
from retro.platform.timing import Timings, merge
import time

_ROWS_PER_SHARD = 8_192   # ~2 min per shard on one CPU core: resume and progress granularity


class EmbedParams(StageParams):
    embedder: Node("embedder")
    """The embedder node."""


@stage("embed", version="2", params=EmbedParams, distributed=False,
       inputs={"chunk_db": "the chunk table (chunk-db)", "tokens": "document tokens (tokenize)",
               "tokenizer": "the decoder tokenizer, to detokenize chunks (tokenizer)"},
       estimate=lambda p: {"model": p.embedder.model or "MiniLM-L6",
                           **precision_info(p, "embedder")})
def embed(ctx: StageContext[EmbedParams]) -> dict:
    """Embed the DB chunks.

    Params: `embedder` (the embedder node). Inputs: `chunk_db`, `tokens`, `tokenizer`.
    Files: `embeddings.npy` [n_chunks, dim] (embedder.dtype), `meta.json` {dim, dtype, n}.
    """
    embedder = build_component("embedder", ctx.params.embedder)
    dim = embedder.dim  # raises for a missing encoder folder before anything is read
    db = ChunkDB(ctx.inputs["chunk_db"].path, ctx.inputs["tokens"].path)
    n, dtype = db.n_chunks, embedder.config.dtype
    work = ctx.work_dir / "embeddings.npy"
    if not (work.exists() and open_memmap(work).shape == (n, dim)):
        open_memmap(work, dtype, (n, dim), mode="w+").flush()
    n_shards = shard_count(ctx, n, _ROWS_PER_SHARD)
    ranges = shard_ranges(n, n_shards, embedder.window)
    jobs = [{"embedder": ctx.params.embedder.model_dump(mode="json"), "chunk_db": str(ctx.inputs["chunk_db"].path),
             "tokens": str(ctx.inputs["tokens"].path),
             "tokenizer": str(ctx.inputs["tokenizer"].path), "out": str(work), "a": a, "b": b}
            for a, b in ranges]
    stats = run_shards(ctx, _embed_shard, jobs, [b - a for a, b in ranges], "embed chunks")
    os.replace(work, ctx.out_dir / "embeddings.npy")
    write_meta(ctx.out_dir, dim=dim, dtype=dtype, n=n)
    seconds = sum(s["seconds"] for s in stats)
    report_shard_precision(ctx, stats, embedder.config.precision)
    ctx.add_times(merge(*(s.get("time_s") for s in stats)))
    return {"n": n, "dim": dim, "empty_chunks": sum(s["empty"] for s in stats),
            "chunks_per_s_per_worker": n / max(seconds, 1e-9)}


def _embed_shard(job: dict) -> dict:
    """Embed rows [a, b) into the shared memmap; returns timing and empty-chunk counts."""

    marker = done_marker(Path(job["out"]).parent, f"embed-{job['a']:012d}")
    if marker.exists():
        return {"seconds": 0.0, "empty": 0}
    t0 = time.time()
    embedder = build_component("embedder", job["embedder"])
    embedder.load()
    db = ChunkDB(job["chunk_db"], job["tokens"])
    decoder = raw_tokenizer(job["tokenizer"])
    out = open_memmap(job["out"], mode="r+")
    empty, timer = 0, Timings()
    for a in range(job["a"], job["b"], embedder.window):
        b = min(a + embedder.window, job["b"])
        with timer("tokenize"):
            enc = embedder.tokenize(db.texts(a, b, decoder))
        empty += sum(1 for m in enc["special_tokens_mask"] if all(m))
        with timer("forward"):
            emb = embedder.embed_tokenized(enc)
        with timer("io"):
            out[a:b] = emb
    with timer("io"):
        out.flush()
    marker.touch()
    return {"seconds": time.time() - t0, "empty": empty, "precision": embedder.precision,
            "device": embedder.device, "time_s": timer.as_dict()}

