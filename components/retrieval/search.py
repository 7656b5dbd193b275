"""Text -> (scores, chunk ids) searchers shared by the neighbours stage and the Retriever.

`DenseSearcher` embeds queries with the DB's encoder and searches the faiss index;
`BM25Searcher` scores them with bm25s. Both return top-n `(scores, ids)` arrays padded with -1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from retro.platform.errors import UserError
from retro.platform.timing import Timings
from retro.components.retrieval.faiss_index import to_gpu
from retro.platform.registry import registry

BM25_DIR = "bm25"


class DenseSearcher:
    """Encoder + faiss index. `encode` can be swapped (a fine-tuned query encoder)."""

    def __init__(self, embedder: Any, index_spec: Any, index_file: Path,
                 encode: Optional[Callable[[list[str]], np.ndarray]] = None, log: Any = None):

        self.embedder = embedder
        self.index = to_gpu(index_spec.read(index_file), log)
        self.index_spec = index_spec
        self.encode = encode or embedder.embed
        self.times = Timings()            # forward (query encoding) and search seconds
        if encode is None and embedder.dim != self.index.d:
            raise UserError(f"dims mismatch: the encoder {embedder.path} gives {embedder.dim}-d "
                            f"embeddings but the index has d={self.index.d}; use the encoder the "
                            "DB was embedded with, or rebuild the index")

    @property
    def window(self) -> int:
        return self.embedder.window

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search_vectors(self, emb: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-n (scores, ids) for query embeddings [m, d]."""
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.index.d:
            raise UserError(f"dims mismatch: query embeddings have shape {emb.shape} but the "
                            f"index has d={self.index.d}")
        with self.times("search"):
            scores, ids = self.index.search(emb, n)
        return scores, ids.astype(np.int64)

    def search_texts(self, texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
        with self.times("forward"):
            emb = self.encode(texts)
        return self.search_vectors(emb, n)

    def precision_report(self) -> dict[str, str]:
        """What the query encoder ran in ({} before it ran), for the stage's manifest."""
        if not hasattr(self.embedder, "precision"):
            return {}
        return {"precision": self.embedder.precision, "device": self.embedder.device,
                "requested": self.embedder.config.precision}


class BM25Searcher:
    """A bm25s index over the DB chunk texts (row i = chunk i)."""

    window = 4096

    def __init__(self, bm25_dir: Path, stopwords: Optional[str]):
        import bm25s

        self.model = bm25s.BM25.load(str(bm25_dir), mmap=True)
        self.stopwords = stopwords
        self.n_docs = int(self.model.scores["num_docs"])
        self.times = Timings()

    def precision_report(self) -> dict[str, str]:
        return {}                         # no model runs

    @property
    def ntotal(self) -> int:
        return self.n_docs

    def search_texts(self, texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
        import bm25s

        n = min(n, self.n_docs)
        with self.times("search"):
            q = bm25s.tokenize(texts, stopwords=self.stopwords, show_progress=False)
            ids, scores = self.model.retrieve(q, k=n, show_progress=False, n_threads=1)
        ids = np.asarray(ids, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)
        ids[scores <= 0] = -1  # no shared term: not a hit
        return scores, ids


def build_searcher(retriever_node: dict, inputs: dict[str, Any], log: Any = None,
                   encode: Optional[Callable] = None):
    """A searcher for a retriever node (the fields searching needs, at least), from the
    artifacts of its index stages (`search_slot`)."""

    return registry.build("retriever", retriever_node).searcher(inputs, log, encode)
