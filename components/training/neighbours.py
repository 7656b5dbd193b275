"""Neighbour tokens of training sequences, read from the retrieval artifacts in the worker."""

from __future__ import annotations

from typing import Optional

import numpy as np


class DBNeighbours:
    """`tokens(rows) -> [b, chunks, k, 2m]`: each neighbour chunk and its continuation.

    A missing neighbour (id -1) becomes a row of -1, which the model masks out as keys
    (the chunk DB would pad it with EOD tokens, which the model would attend to).

    Args:
        neighbours_path: a `neighbours` artifact (ids [n_seq, chunks, K], -1 padded).
        chunk_db_path: the `chunk-db` artifact the ids index.
        tokens_path: the `tokenize` artifact the chunk DB was built from.
        k: neighbours used per chunk (the first k of K); None: all K.
    """

    def __init__(self, neighbours_path: str, chunk_db_path: str, tokens_path: str,
                 k: Optional[int] = None):
        from retro.components.retrieval.api import ChunkDB, Neighbours

        self.ids = Neighbours(neighbours_path).ids
        self.db = ChunkDB(chunk_db_path, tokens_path)
        self.k = k

    def tokens(self, rows: np.ndarray) -> np.ndarray:
        ids = np.asarray(self.ids[np.asarray(rows)], dtype=np.int64)[..., :self.k]
        toks = self.db.neighbour_tokens(ids)                       # [b, chunks, k, 2m]
        toks[ids < 0] = -1
        return toks
