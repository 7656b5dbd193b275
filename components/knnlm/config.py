"""The `knn-lm` and `in-context-ralm` evaluators: their spec nodes.

Both score the tokens `eval-ppl` scores (tokens 1..n-1 of each sequence of the `split`
sequences artifact), so `retro report` pairs them with a `ppl` evaluator's no-retrieval
baseline of the same model when the scoring protocol fields agree (`PROTOCOL_FIELDS`, the same
names and defaults as the `ppl` node's).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from retro.components.precision import Precision
from retro.components.retrieval import faiss_index  # noqa: F401 - registers the `faiss` index
from retro.platform.registry import StrictModel, register, registry
from retro.platform.spec.node import Node

PROTOCOL_FIELDS = ("split", "max_sequences", "batch_size", "precision")
"""The fields a `ppl` node shares with these evaluators: equal values make them one results
family (components/evaluators/results.py), so the report pairs sequences and gives CIs."""

DATASTORE_FIELDS = ("key", "fp16", "max_train_sequences", "precision")
"""What the `knn-datastore` stage reads: never k, lmbda, temperature (a sweep shares it)."""

KNN_FIELDS = PROTOCOL_FIELDS + ("k", "lmbda", "temperature", "recompute_distances")
"""What an `eval-knnlm` call reads from its node (the index node goes to train-index)."""

RALM_FIELDS = PROTOCOL_FIELDS + ("stride", "query_length", "docs", "ensemble",
                                 "ensemble_weights", "doc_tokens", "continuation", "title",
                                 "context_window", "candidates")


def default_index() -> object:
    """The kNN-LM index default, a validated node (a narrowed node's unpicked fields take their
    defaults unvalidated): exact `Flat` search with metric l2 (squared L2, the paper's)."""

    return registry.get("index", "faiss").node_model().model_validate(
        {"type": "faiss", "factory": "Flat", "metric": "l2"})


class _Protocol(StrictModel):
    split: str = "valid"
    """Sequences split scored (`valid`: documents not in the DB)."""
    max_sequences: Optional[int] = Field(256, ge=1)
    """Score at most this many sequences (the first ones; None: all), as the `ppl` node."""
    batch_size: int = Field(4, ge=1)
    """Sequences per forward pass."""
    precision: Precision = "auto"
    """LM compute precision, as the `ppl` node's (docs/precision.md)."""


@register("evaluator", "knn-lm")
class KnnLmEvaluator:
    """kNN-LM perplexity: p = lmbda * p_kNN + (1 - lmbda) * p_LM over a datastore of the train
    split (Khandelwal et al. 2020, Eq. 1-3)."""

    class Config(_Protocol):
        key: Literal["ffn_input", "final"] = "ffn_input"
        """Which hidden state is the key: `ffn_input` = the input of the last layer's
        feed-forward block, after its layer norm (the paper's best, Table 5; knn-transformers'
        `last_ffn_input`); `final` = the input of the output layer (after the final norm,
        what the logits are computed from)."""
        fp16: bool = False
        """Store keys as float16 (knn-transformers' and `--dstore-fp16`'s layout; values stay
        int32, which holds any vocabulary). False: float32 (urvashik/knnlm's default)."""
        max_train_sequences: Optional[int] = Field(None, ge=1)
        """Datastore over at most this many train sequences (None: the whole train split)."""
        index: Node("index") = Field(default_factory=lambda: default_index())
        """faiss index over the keys (any factory; the paper: `IVF4096,PQ64`, nprobe 32,
        metric l2 = squared L2)."""
        k: int = Field(1024, ge=1)
        """Neighbours retrieved per token (paper: 1024)."""
        lmbda: float = Field(0.25, ge=0.0, le=1.0)
        """Interpolation weight of p_kNN (paper: 0.25 on WikiText-103, tuned on validation)."""
        temperature: float = Field(1.0, gt=0.0)
        """p_kNN ∝ exp(-d / temperature) (paper: 1; knn-transformers `knn_temp`)."""
        recompute_distances: bool = True
        """Re-rank the retrieved keys by exact squared L2 to their stored vectors (the paper's
        best setting, 16.5 -> 16.06 dev ppl); False: the index's (PQ-approximate) distances."""

    def __init__(self, config: Config) -> None:
        self.config = config


@register("evaluator", "in-context-ralm")
class InContextRalmEvaluator:
    """In-context RALM perplexity (Ram et al. 2023): every `stride` tokens, retrieve with the
    last `query_length` tokens and prepend the retrieved text to a frozen LM's context."""

    class Config(_Protocol):
        stride: int = Field(4, ge=1)
        """Retrieve every this many tokens (paper: 4)."""
        query_length: int = Field(32, ge=1)
        """Query = the last this many tokens before the stride (paper: 32 BM25, 64 dense)."""
        docs: int = Field(1, ge=1)
        """Retrieved documents used per stride (paper: 1)."""
        ensemble: bool = False
        """REPLUG: average p(y | d ∘ x) over the `docs` documents, weighted by
        `ensemble_weights` (False: the top document only; `docs` must then be 1)."""
        ensemble_weights: Literal["retriever", "uniform"] = "retriever"
        """REPLUG weights: softmax of the retriever scores (ip / bm25 as is, l2 negated) or
        uniform (REPLUG's GPT-3 path)."""
        doc_tokens: int = Field(256, ge=1)
        """Retrieved text kept per document, in tokens (paper: 256)."""
        continuation: bool = True
        """A document is the retrieved DB chunk followed by its continuation (RETRO's
        neighbour; two chunks ≈ the paper's 100-word passage); False: the chunk alone."""
        title: bool = True
        """Start each document with its corpus title and a newline (the paper's
        `title + "\\n" + text`), counted in `doc_tokens`."""
        context_window: Optional[int] = Field(None, ge=2)
        """Tokens of retrieved text + preceding tokens + the scored stride at most (the prefix
        is cut from the left). None: the sequence length, the no-retrieval baseline's
        budget."""
        candidates: int = Field(32, ge=1)
        """Hits fetched per query before dropping the evaluated documents' chunks."""

        @model_validator(mode="after")
        def _one_doc_without_ensemble(self) -> "InContextRalmEvaluator.Config":
            if self.docs > 1 and not self.ensemble:
                raise ValueError(f"docs = {self.docs} needs `ensemble: true` (REPLUG); the "
                                 "paper prepends one document: set docs: 1")
            if self.candidates < self.docs:
                raise ValueError(f"candidates ({self.candidates}) must be >= docs ({self.docs})")
            return self

    def __init__(self, config: Config) -> None:
        self.config = config
