"""Query-time retrieval over the cached DB: free-text queries -> passages (QA eval, RA-DIT).

    retriever = Retriever.from_artifacts(spec.retriever, {"tokenizer": ..., "tokens": ...,
                                         "chunk_db": ..., "index": ...})   # or "bm25": ...
    retriever.search(["who wrote the iliad"], k=5)  # -> [[Passage(chunk_id, doc_id, ...)]]

RA-DIT swaps the query encoder only: `retriever.with_query_encoder(fn)` where
`fn(list[str]) -> np.ndarray [n, d]`; the DB embeddings and index stay as built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import numpy as np

from retro.components.retrieval.chunking import ChunkDB
from retro.components.retrieval.search import DenseSearcher, build_searcher
from retro.components.tokenizers.stage import load_tokenizer
from retro.platform.errors import UserError
from retro.platform.registry import registry

RETRIEVER_SLOTS = ("tokenizer", "tokens", "chunk_db")
"""Input slots every retriever needs, plus `index` (dense: fill-index) or `bm25` (bm25-index)."""


@dataclass(frozen=True)
class Passage:
    """One retrieved DB chunk."""

    chunk_id: int
    """Row of the chunk DB (= faiss / bm25 id)."""
    doc_id: str
    """The corpus document id (e.g. the Wikipedia page id)."""
    text: str
    """Chunk text, decoded with the decoder tokenizer."""
    score: float
    """Raw index score: inner product (higher is better) for metric ip, squared L2 distance
    (lower is better) for l2, BM25 score for bm25."""
    title: str = ""
    """Document title, when the corpus has one."""


class Retriever:
    """Searches the retrieval DB with free text. Build it with `from_artifacts`."""

    def __init__(self, searcher: Any, chunk_db: ChunkDB, tokenizer: Any):
        self.searcher, self.chunk_db, self.tokenizer = searcher, chunk_db, tokenizer

    @classmethod
    def from_artifacts(cls, retriever: Any, inputs: Mapping[str, Any],
                       query_encoder: Optional[Callable[[list[str]], np.ndarray]] = None
                       ) -> "Retriever":
        """Build from the spec's retriever node and the artifacts of the DB stages.

        Args:
            retriever: the `retriever` node (validated model or its JSON dict).
            inputs: slot -> Artifact or folder: `tokenizer`, `tokens`, `chunk_db`, and `index`
                (dense, the fill-index artifact) or `bm25` (the bm25-index artifact).
            query_encoder: optional replacement query encoder (dense only).

        Raises:
            UserError: a slot is missing, or the query encoder's dim differs from the index.
        """

        node = retriever if isinstance(retriever, dict) else retriever.model_dump(mode="json")
        kind = registry.get("retriever", node["type"]).obj
        need = RETRIEVER_SLOTS + (kind.search_slot,)
        missing = [s for s in need if s not in inputs]
        if missing:
            raise UserError(f"Retriever.from_artifacts needs input slots {list(need)}; "
                            f"missing {missing}")
        if query_encoder is not None and not kind.query_encoder:
            raise UserError(f"a query encoder only applies to dense retrievers, not "
                            f"{node['type']!r}")
        searcher = build_searcher(node, inputs, encode=query_encoder)
        return cls(searcher, ChunkDB(inputs["chunk_db"], inputs["tokens"]),
                   load_tokenizer(inputs["tokenizer"]))

    @property
    def dense(self) -> bool:
        return isinstance(self.searcher, DenseSearcher)

    def encode_queries(self, queries: list[str]) -> np.ndarray:
        """Query embeddings [n, d] with the current query encoder (dense only)."""
        if not self.dense:
            raise UserError("encode_queries: a bm25 retriever has no query encoder")
        return self.searcher.encode(list(queries))

    def with_query_encoder(self, encode: Callable[[list[str]], np.ndarray]) -> "Retriever":
        """A retriever sharing this DB and index but encoding queries with `encode`."""
        if not self.dense:
            raise UserError("with_query_encoder: a bm25 retriever has no query encoder")
        s = self.searcher
        swapped = object.__new__(DenseSearcher)
        swapped.__dict__.update(s.__dict__, encode=encode)
        return Retriever(swapped, self.chunk_db, self.tokenizer)

    def search_embeddings(self, emb: np.ndarray, k: int) -> list[list[Passage]]:
        """Passages for query embeddings [n, d] (dense only)."""
        if not self.dense:
            raise UserError("search_embeddings: a bm25 retriever takes text queries")
        return self._passages(*self.searcher.search_vectors(emb, k))

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        """Top-k passages for each query, best first (fewer when the DB has fewer hits)."""
        if self.dense:
            return self.search_embeddings(self.encode_queries(queries), k)
        return self._passages(*self.searcher.search_texts(list(queries), k))

    def _passages(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Passage]]:
        docs = self.chunk_db.doc_table()
        doc_idx = self.chunk_db.doc_of(ids)
        out = []
        for row_ids, row_scores, row_docs in zip(ids, scores, doc_idx):
            out.append([Passage(int(i), docs[d]["id"], self.chunk_db.chunk_text(i, self.tokenizer),
                                float(s), docs[d].get("title", ""))
                        for i, s, d in zip(row_ids, row_scores, row_docs) if i >= 0])
        return out
