"""Retriever components (the spec's `retriever:` section): `dense` (default) and `bm25`.

A retriever config holds everything the retrieval DB depends on: chunk length, document split,
the encoder and index (dense) or BM25 parameters (sparse), neighbour and quality settings.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional

from pydantic import Field, model_validator

from retro.components.retrieval.chunking import SplitConfig
from retro.platform.registry import StrictModel, register, registry
from retro.platform.spec.node import Node
from retro.platform.stage import StageCall
from retro.components.retrieval.common import artifact_path
from retro.components.retrieval.faiss_index import FILLED
from retro.components.retrieval.search import BM25Searcher, BM25_DIR, DenseSearcher
from retro.platform.errors import UserError

# A retriever component answers for itself (no `type ==` branches elsewhere):
#   index_calls(db)  the stage calls that build its index from the DB calls `db` (chunk_db,
#                    tokens, tokenizer), and the input slots a searcher takes from them;
#   searcher(inputs) the searcher over those artifacts;
#   search_slot      the slot holding its index; query_encoder: whether queries can use a
#                    replacement (fine-tuned) encoder.


class NeighboursConfig(StrictModel):
    """Neighbour search for training sequences (Megatron: 200 queried, 20 saved, 2 used)."""

    candidates: int = Field(200, ge=1)
    """Hits searched per chunk before same-document filtering."""
    k: int = Field(2, ge=1)
    """Neighbours kept per chunk (padded with -1 when fewer survive the filter)."""

    @model_validator(mode="after")
    def _k_le_candidates(self) -> "NeighboursConfig":
        if self.k > self.candidates:
            raise ValueError(f"k={self.k} is larger than candidates={self.candidates}; "
                             "search at least k candidates")
        return self


class QualityConfig(StrictModel):
    """Recall of the approximate index against exact search on a probe of DB chunks."""

    probe_size: int = Field(1000, ge=1)
    """DB chunks used as queries (seeded sample)."""
    recall_at: list[int] = [1, 2, 10]
    """Cut-offs k reported as recall@k = |approx top-k ∩ exact top-k| / k."""
    min_recall: Optional[float] = Field(None, ge=0, le=1)
    """Stop the run (before training) when recall@min_recall_at is below this."""
    min_recall_at: int = Field(2, ge=1)
    """The k that min_recall applies to."""
    seed: int = 0
    """Seed of the probe sample."""


@register("retriever", "dense", default=True)
class DenseRetrieverSpec:
    """Dense retrieval: an HF encoder embeds chunks, a faiss index searches them."""

    class Config(StrictModel):
        chunk_length: int = Field(64, ge=1)
        """Tokens per chunk (RETRO: 64)."""
        embedder: Node("embedder") = Field(default_factory=dict, validate_default=True)
        """Chunk and query encoder."""
        index: Node("index") = Field(default_factory=dict, validate_default=True)
        """Nearest-neighbour index over chunk embeddings."""
        neighbours: NeighboursConfig = NeighboursConfig()
        """Neighbour search for training sequences."""
        split: SplitConfig = SplitConfig()
        """Document split into train (the DB) / valid / heldout."""
        quality: QualityConfig = QualityConfig()
        """Index recall check (and optional minimum)."""

        @model_validator(mode="after")
        def _index_fits_embedder(self) -> Any:
            check_index_against_embedder(self.embedder, self.index)
            return self

    search_slot = "index"
    query_encoder = True

    def __init__(self, config: Any):
        self.config = config

    def index_calls(self, db: dict[str, StageCall]
                    ) -> tuple[list[StageCall], dict[str, StageCall]]:
        embed = StageCall("embed", "embed", reads={"embedder": "retriever.embedder"}, inputs=db)
        trained = StageCall("train-index", "train-index", reads={"index": "retriever.index"},
                            inputs={"embeddings": embed})
        filled = StageCall("fill-index", "fill-index",
                           inputs={"index": trained, "embeddings": embed})
        quality = StageCall("retrieval-quality", "retrieval-quality",
                            reads={"index": "retriever.index", "quality": "retriever.quality"},
                            inputs={"embeddings": embed, "index": filled})
        return [embed, trained, filled, quality], {"index": filled}

    def searcher(self, inputs: dict[str, Any], log: Any = None,
                 encode: Optional[Callable] = None) -> Any:
        return DenseSearcher(registry.build("embedder", self.config.embedder),
                             registry.build("index", self.config.index),
                             artifact_path(inputs["index"]) / FILLED, encode, log)


@register("retriever", "bm25")
class BM25RetrieverSpec:
    """Sparse retrieval with BM25 (bm25s) over the same chunk DB; no embedding/index stages."""

    class Config(StrictModel):
        chunk_length: int = Field(64, ge=1)
        """Tokens per chunk (RETRO: 64)."""
        neighbours: NeighboursConfig = NeighboursConfig()
        """Neighbour search for training sequences."""
        split: SplitConfig = SplitConfig()
        """Document split into train (the DB) / valid / heldout."""
        method: Literal["lucene", "robertson", "atire", "bm25l", "bm25+"] = "lucene"
        """BM25 variant (bm25s `method`)."""
        k1: float = Field(1.5, gt=0)
        """Term-frequency saturation."""
        b: float = Field(0.75, ge=0, le=1)
        """Length normalisation."""
        stopwords: Optional[str] = "en"
        """bm25s stopword list (`en`), or None to keep every word."""

    search_slot = "bm25"
    query_encoder = False

    def __init__(self, config: Any):
        self.config = config

    def index_calls(self, db: dict[str, StageCall]
                    ) -> tuple[list[StageCall], dict[str, StageCall]]:
        bm25 = StageCall("bm25-index", "bm25-index",
                         reads={p: f"retriever.{p}" for p in ("method", "k1", "b", "stopwords")},
                         inputs=db)
        return [bm25], {"bm25": bm25}

    def searcher(self, inputs: dict[str, Any], log: Any = None,
                 encode: Optional[Callable] = None) -> Any:
        return BM25Searcher(artifact_path(inputs["bm25"]) / BM25_DIR, self.config.stopwords)


def check_index_against_embedder(embedder_node: Any, index_node: Any) -> None:
    """Validate the index factory for the embedder's dim when both are known (cheap).

    Raises:
        ValueError: the factory does not build for that dim, or `index.dim` disagrees.
    """

    try:
        dim = registry.get("embedder", embedder_node.type).obj(embedder_node).dim
    except Exception:  # noqa: BLE001 - encoder not readable here: checked again when run
        return
    index = registry.get("index", index_node.type).obj(index_node)
    if getattr(index_node, "factory", "Flat") == "Flat" and getattr(index_node, "dim", None) in \
            (None, dim):
        return  # nothing to check; skip importing faiss during validation
    try:
        index.check(dim)
    except UserError as e:
        raise ValueError(str(e)) from None
