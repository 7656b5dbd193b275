"""The `bm25-index` stage: a bm25s index over the decoded DB chunk texts (row i = chunk i).

bm25s keeps its sparse score matrix in memory while indexing (not flat in corpus size); the
saved index is loaded memory-mapped by `BM25Searcher`.
"""

from __future__ import annotations

from typing import Literal, Optional

from retro.components.retrieval.chunking import ChunkDB, raw_tokenizer
from retro.components.retrieval.common import write_meta
from retro.components.retrieval.search import BM25_DIR
from retro.platform.stage import StageContext, StageParams, stage

_DECODE_BLOCK = 65_536


class BM25Params(StageParams):
    method: Literal["lucene", "robertson", "atire", "bm25l", "bm25+"]
    """BM25 variant (bm25s `method`)."""
    k1: float
    """Term-frequency saturation."""
    b: float
    """Length normalisation."""
    stopwords: Optional[str]
    """bm25s stopword list, or None."""


@stage("bm25-index", version="2", params=BM25Params,
       inputs={"chunk_db": "the chunk table (chunk-db)", "tokens": "document tokens (tokenize)",
               "tokenizer": "the decoder tokenizer, to detokenize chunks (tokenizer)"})
def bm25_index(ctx: StageContext[BM25Params]) -> dict:
    """Index every DB chunk with BM25.

    Params: `method`, `k1`, `b`, `stopwords` (from the bm25 retriever). Inputs: `chunk_db`,
    `tokens`, `tokenizer`. Files: `bm25/` (bm25s save format), `meta.json` {n, vocab}.
    """
    import bm25s

    p = ctx.params
    db = ChunkDB(ctx.inputs["chunk_db"].path, ctx.inputs["tokens"].path)
    decoder = raw_tokenizer(ctx.inputs["tokenizer"].path)
    texts: list[str] = []
    with ctx.progress(db.n_chunks, "bm25 decode chunks") as bar:
        for a in range(0, db.n_chunks, _DECODE_BLOCK):
            texts += db.texts(a, min(a + _DECODE_BLOCK, db.n_chunks), decoder)
            bar.update(min(_DECODE_BLOCK, db.n_chunks - a))
    corpus_tokens = bm25s.tokenize(texts, stopwords=p.stopwords, show_progress=False)
    del texts
    model = bm25s.BM25(method=p.method, k1=p.k1, b=p.b)
    model.index(corpus_tokens, show_progress=False)
    model.save(str(ctx.out_dir / BM25_DIR))
    vocab = len(corpus_tokens.vocab)
    write_meta(ctx.out_dir, n=db.n_chunks, vocab=vocab)
    return {"n": db.n_chunks, "vocab": vocab}
