"""Embed each distinct chunk once: query chunks that ARE DB chunks reuse the embed stage's vectors.

The neighbours stage embeds the text of every m-token chunk of every training sequence. A
query chunk gives the encoder exactly the text of a DB chunk when their token ids are equal
after dropping EOD: both sides are detokenized with `skip_special_tokens` (the neighbours stage
decodes the sequence chunk, the embed stage decodes the DB chunk's tokens, which
`ChunkDB.chunk_tokens` right-pads with EOD), so equal EOD-free ids mean equal texts, equal
encoder tokens and the same embedding function. The match is an exact comparison of the id
rows (sorted byte keys), not a digest. Unequal ids never match; ids that differ only in other
special tokens merely miss a match (they are embedded as before).

How much this saves depends on how sequences are cut: documents are concatenated with an EOD
after each (Megatron's GPT samples), so only documents that happen to start at a chunk
boundary of the stream line up with their DB chunks (docs/benchmarks.md, "Neighbours").
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from retro.components.retrieval.common import artifact_path
from retro.platform.store import open_memmap

_BLOCK = 1 << 16


def eod_free_keys(tokens: np.ndarray, eod: int) -> np.ndarray:
    """[N, m] token ids -> N byte keys, equal iff the rows are equal with EOD removed (the
    kept ids move to the front, in order; the rest is -1)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    drop = tokens == eod
    order = np.argsort(drop, axis=1, kind="stable")          # kept ids first, in order
    packed = np.take_along_axis(tokens, order, axis=1).astype(np.int32)
    packed[np.take_along_axis(drop, order, axis=1)] = -1
    packed = np.ascontiguousarray(packed)
    return packed.view(np.dtype((np.void, packed.shape[1] * 4))).ravel()


class DBChunkLookup:
    """Which DB row (if any) has the same EOD-free token ids as each query chunk.

    Args:
        db: the ChunkDB (its chunks are right-padded with EOD to m tokens).
        eod: the EOD id of the token stream.
    """

    def __init__(self, db: Any, eod: int):
        self.eod = eod
        keys = np.concatenate([eod_free_keys(db.chunk_tokens(np.arange(a, min(a + _BLOCK,
                                                                              db.n_chunks))), eod)
                               for a in range(0, db.n_chunks, _BLOCK)]) if db.n_chunks else \
            np.zeros(0, dtype=np.dtype((np.void, db.chunk_length * 4)))
        self._order = np.argsort(keys, kind="stable")            # equal keys: lowest row first
        self._sorted = keys[self._order]

    def rows(self, chunks: np.ndarray) -> np.ndarray:
        """DB row of each query chunk [N, m] (the lowest among equal ones), -1 where none."""
        if len(self._sorted) == 0:
            return np.full(len(chunks), -1, dtype=np.int64)
        keys = eod_free_keys(chunks, self.eod)
        pos = np.minimum(np.searchsorted(self._sorted, keys), len(self._sorted) - 1)
        hit = self._sorted[pos] == keys
        return np.where(hit, self._order[pos], -1).astype(np.int64)


def chunk_embeddings(texts: list[str], rows: np.ndarray, db_embeddings: Optional[np.ndarray],
                     encode: Any) -> tuple[np.ndarray, int]:
    """Query embeddings [N, d] float32: DB rows' stored vectors where `rows` >= 0, `encode`
    of the other texts (in their order) elsewhere; returns them and how many were reused."""
    if db_embeddings is None:
        return np.asarray(encode(texts), dtype=np.float32), 0
    found = np.flatnonzero(rows >= 0)
    rest = np.flatnonzero(rows < 0)
    out = np.empty((len(texts), db_embeddings.shape[1]), dtype=np.float32)
    if len(found):
        take = rows[found]
        order = np.argsort(take)                                 # memmap reads in row order
        out[found[order]] = np.asarray(db_embeddings[take[order]], dtype=np.float32)
    if len(rest):
        out[rest] = encode([texts[i] for i in rest])
    return out, int(len(found))


def reusable_embeddings(path: Any, log: Any = None) -> Optional[np.ndarray]:
    """The embed stage's `embeddings.npy` as a memmap when its vectors are what a query would
    get (float32 storage); None otherwise (float16 storage rounds them: embed everything)."""

    emb = open_memmap(artifact_path(path) / "embeddings.npy")
    if emb.dtype != np.float32:
        if log is not None:
            log.info("DB embeddings are stored as %s: query chunks are all embedded", emb.dtype)
        return None
    return emb


def query_chunk_array(chunks: list[list[int]], m: int, eod: int) -> np.ndarray:
    """Query chunks as [N, m], a short last chunk right-padded with EOD (ignored by the keys)."""
    out = np.full((len(chunks), m), eod, dtype=np.int64)
    for i, c in enumerate(chunks):
        out[i, :len(c)] = c
    return out


def search_reusing(searcher: Any, texts: list[str], chunks: np.ndarray, lookup: DBChunkLookup,
                   db_embeddings: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """`searcher.search_texts(texts, n)`, with the vectors of query chunks found in the DB read
    from `db_embeddings` instead of encoded; returns (scores, ids, chunks reused)."""
    rows = lookup.rows(chunks)
    with searcher.times("forward"):
        emb, reused = chunk_embeddings(texts, rows, db_embeddings, searcher.encode)
    scores, ids = searcher.search_vectors(emb, n)
    return scores, ids, reused
