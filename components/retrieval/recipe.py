"""The `retro-db` recipe (retrieval DB only) and `db_stage_calls`, reused by training recipes.

Dense:  tokenizer -> tokenize -> chunk-db -> sequences-{train,valid} -> embed -> train-index
        -> fill-index -> neighbours-{train,valid}, retrieval-quality
BM25:   tokenizer -> tokenize -> chunk-db -> sequences-{train,valid} -> bm25-index
        -> neighbours-{train,valid}
"""

from __future__ import annotations

from typing import Any, Iterable, Literal

from pydantic import Field

from retro.platform.errors import SpecIssue
from retro.platform.registry import StrictModel, register, registry
from retro.platform.stage import StageCall


def db_stage_calls(spec: Any, seq_length: str = "recipe.seq_length",
                   splits: Iterable[str] = ("train", "valid")) -> list[StageCall]:
    """Stage calls that build the retrieval DB and the neighbours of `splits`.

    Args:
        spec: the validated spec (reads its `tokenizer`, `corpus` and `retriever` types).
        seq_length: dotted spec path of the training sequence length.
        splits: sequence splits that get `sequences-<split>` and `neighbours-<split>` calls.

    Returns:
        Calls named as in the module docstring. Downstream stages take `sequences-<split>`,
        `neighbours-<split>`, `chunk-db`, `tokenize`, `tokenizer` (and `retrieval-quality`, to
        stop before training when recall is too low) as inputs.
    """
    trains = getattr(registry.get("tokenizer", spec.tokenizer.type).obj, "needs_corpus", False)
    calls = [
        StageCall("tokenizer", "tokenizer",
                  reads={"tokenizer": "tokenizer", **({"corpus": "corpus"} if trains else {})}),
        StageCall("tokenize", "tokenize", reads={"corpus": "corpus"},
                  inputs={"tokenizer": "tokenizer"}),
        StageCall("chunk-db", "chunk-db", reads={"chunk_length": "retriever.chunk_length",
                                                 "split": "retriever.split"},
                  inputs={"tokens": "tokenize"}),
    ]
    dense = spec.retriever.type != "bm25"
    if dense:
        calls += [
            StageCall("embed", "embed", reads={"embedder": "retriever.embedder"},
                      inputs={"chunk_db": "chunk-db", "tokens": "tokenize",
                              "tokenizer": "tokenizer"}),
            StageCall("train-index", "train-index", reads={"index": "retriever.index"},
                      inputs={"embeddings": "embed"}),
            StageCall("fill-index", "fill-index", inputs={"index": "train-index",
                                                          "embeddings": "embed"}),
            StageCall("retrieval-quality", "retrieval-quality",
                      reads={"index": "retriever.index", "quality": "retriever.quality"},
                      inputs={"embeddings": "embed", "index": "fill-index"}),
        ]
        search_reads = {"embedder": "retriever.embedder", "index": "retriever.index"}
        search_inputs = {"index": "fill-index"}
    else:
        calls.append(StageCall("bm25-index", "bm25-index",
                               reads={p: f"retriever.{p}" for p in ("method", "k1", "b",
                                                                    "stopwords")},
                               inputs={"chunk_db": "chunk-db", "tokens": "tokenize",
                                       "tokenizer": "tokenizer"}))
        search_reads = {"stopwords": "retriever.stopwords"}
        search_inputs = {"bm25": "bm25-index"}
    for split in splits:
        calls += [
            StageCall(f"sequences-{split}", "sequences", reads={"seq_length": seq_length},
                      consts={"split": split},
                      inputs={"tokens": "tokenize", "chunk_db": "chunk-db"}),
            StageCall(f"neighbours-{split}", "neighbours",
                      reads={"neighbours": "retriever.neighbours",
                             "retriever_type": "retriever.type", **search_reads},
                      inputs={"sequences": f"sequences-{split}", "chunk_db": "chunk-db",
                              "tokens": "tokenize", "tokenizer": "tokenizer", **search_inputs}),
        ]
    return calls


def retriever_inputs(spec: Any) -> dict[str, str]:
    """Input slot -> call name for a stage that builds a `Retriever` (QA eval, RA-DIT)."""
    slots = {"tokenizer": "tokenizer", "tokens": "tokenize", "chunk_db": "chunk-db"}
    if spec.retriever.type == "bm25":
        return {**slots, "bm25": "bm25-index"}
    return {**slots, "index": "fill-index"}


def db_spec_issues(spec: Any) -> list[SpecIssue]:
    """Sections a retrieval DB needs: corpus, tokenizer, retriever."""
    issues = []
    for section, example in (("corpus", "{type: jsonl, paths: [...]}"),
                             ("tokenizer", "{type: train-bpe, vocab_size: 4096}"),
                             ("retriever", "{type: dense}")):
        if getattr(spec, section) is None:
            issues.append(SpecIssue(section, "this recipe needs this section",
                                    hint=f"add e.g. `{section}: {example}`"))
    return issues


@register("recipe", "retro-db")
class RetroDBRecipe:
    """Only the retrieval database: tokens, chunk DB, index, neighbours of train/valid."""

    class Config(StrictModel):
        seq_length: int = Field(2048, ge=1)
        """Training sequence length in tokens (RETRO 2048, InstructRetro 4096)."""
        splits: list[Literal["train", "valid", "heldout"]] = ["train", "valid"]
        """Splits that get training sequences and neighbours ([] builds only the DB/index)."""

    def __init__(self, config: Any):
        self.config = config

    def check(self, spec: Any) -> list[SpecIssue]:
        return db_spec_issues(spec)

    def stages(self, spec: Any) -> list[StageCall]:
        return db_stage_calls(spec, splits=self.config.splits)
