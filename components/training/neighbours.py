"""Neighbour tokens of training rows, read from the retrieval artifacts in the worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
from retro.components.retrieval.api import ChunkDB


class DBNeighbours:
    """`tokens(rows) -> [b, chunks, k, 2m]`: each neighbour chunk and its continuation.

    A missing neighbour (id -1) becomes a row of -1, which the model masks out as keys
    (the chunk DB would pad it with EOD tokens, which the model would attend to).

    Args:
        ids_path: .npy of neighbour ids [n_rows, chunks, K], -1 padded (a `neighbours`
            artifact's `neighbours.npy` or that artifact's folder, or the SFT rows' ids).
        chunk_db_path: the `chunk-db` artifact the ids index.
        tokens_path: the `tokenize` artifact the chunk DB was built from.
        k: neighbours used per chunk (the first k of K); None: all K.
    """

    def __init__(self, ids_path: str, chunk_db_path: str, tokens_path: str,
                 k: Optional[int] = None):

        if Path(ids_path).is_dir():  # a `neighbours` artifact folder
            ids_path = str(Path(ids_path) / "neighbours.npy")
        self.ids = np.load(ids_path, mmap_mode="r")
        self.db = ChunkDB(chunk_db_path, tokens_path)
        self.k = k

    def tokens(self, rows: np.ndarray) -> np.ndarray:
        ids = np.asarray(self.ids[np.asarray(rows)], dtype=np.int64)[..., :self.k]
        toks = self.db.neighbour_tokens(ids)                       # [b, chunks, k, 2m]
        toks[ids < 0] = -1
        return toks


def retrieve_for_rows(retriever: Any, tokenizer: Any, tokens: np.ndarray, seq_length: int,
                      chunk_length: int, k: int, eod: int, batch: int = 256) -> np.ndarray:
    """Neighbour ids of every chunk of token rows (SFT with retrieval on), by searching the DB
    with each chunk's decoded text, as the `neighbours` stage does for pretraining sequences.

    Args:
        retriever: a `retrieval.api.Retriever` over the DB.
        tokenizer: the decoder tokenizer (to turn chunks into query text).
        tokens: rows [n, >= seq_length]; the model sees the first seq_length tokens.
        seq_length, chunk_length, k: model input length, m, neighbours per chunk.
        eod: padding id; an all-padding chunk retrieves nothing.

    Returns:
        int64 [n, ceil(seq_length / m), k], -1 where nothing was found.
    """
    chunks = -(-seq_length // chunk_length)
    out = np.full((len(tokens), chunks, k), -1, dtype=np.int64)
    queries, where = [], []
    for i, row in enumerate(tokens):
        for j in range(chunks):
            piece = [int(t) for t in row[j * chunk_length:min((j + 1) * chunk_length,
                                                              seq_length)] if t != eod]
            if piece:
                queries.append(tokenizer.decode(piece, skip_special_tokens=True))
                where.append((i, j))
    for start in range(0, len(queries), batch):
        hits = retriever.search(queries[start:start + batch], k)
        for (i, j), row_hits in zip(where[start:start + batch], hits):
            ids = [p.chunk_id for p in row_hits[:k]]
            out[i, j, :len(ids)] = ids
    return out


def neighbours_per_chunk(ids_path: Any, params: Any) -> int:
    """Neighbours per chunk a retro-fit run feeds: its `num_neighbours` param (a dict or a
    params model), or, when unset, every neighbour the ids artifact holds."""
    k = params.get("num_neighbours") if isinstance(params, dict) else getattr(
        params, "num_neighbours", None)
    if k:
        return int(k)
    path = Path(ids_path)
    path = path / "neighbours.npy" if path.is_dir() else path
    return int(np.load(path, mmap_mode="r").shape[-1])
