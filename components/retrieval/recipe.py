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
from retro.platform.stage import BaseRecipe, StageCall


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
    # a trained tokenizer learns from the train split only (the split chunk-db applies)
    tokenizer = StageCall("tokenizer", "tokenizer", reads={
        "tokenizer": "tokenizer",
        **({"corpus": "corpus", "split": "retriever.split"} if trains else {})})
    tokenize = StageCall("tokenize", "tokenize", reads={"corpus": "corpus"},
                         inputs={"tokenizer": tokenizer})
    chunk_db = StageCall("chunk-db", "chunk-db", reads={"chunk_length": "retriever.chunk_length",
                                                        "split": "retriever.split"},
                         inputs={"tokens": tokenize})
    db = {"chunk_db": chunk_db, "tokens": tokenize, "tokenizer": tokenizer}
    calls = [tokenizer, tokenize, chunk_db]
    index_calls, search = registry.build("retriever", spec.retriever).index_calls(db)
    calls += index_calls
    # dense: query chunks equal to DB chunks reuse the embed stage's vectors (chunk_reuse.py)
    reuse = {"embeddings": c for c in index_calls if c.stage == "embed"}
    for split in splits:
        seqs = StageCall(f"sequences-{split}", "sequences", reads={"seq_length": seq_length},
                         consts={"split": split}, inputs={"tokens": tokenize, "chunk_db": chunk_db})
        calls += [seqs, StageCall(f"neighbours-{split}", "neighbours",
                                  reads={"neighbours": "retriever.neighbours",
                                         "retriever": "retriever"},
                                  inputs={"sequences": seqs, **db, **search, **reuse})]
    return calls


def call(calls: list[StageCall], name: str) -> StageCall:
    """The call named `name` among `calls` (recipes compose `db_stage_calls` with their own)."""
    return next(c for c in calls if c.name == name)


def retriever_inputs(calls: list[StageCall]) -> dict[str, StageCall]:
    """Input slot -> handle for a stage that builds a `Retriever` (QA eval, RA-DIT): the DB
    plus the dense index or the BM25 index, whichever `db_stage_calls` made."""
    names = {c.name: c for c in calls}
    out = {"tokenizer": names["tokenizer"], "tokens": names["tokenize"],
           "chunk_db": names["chunk-db"]}
    if "fill-index" in names:
        return {**out, "index": names["fill-index"]}
    return {**out, "bm25": names["bm25-index"]}


def resolve_db(spec: Any) -> Any:
    """`spec` with the index's `dim` written out (the embedder's width, read from its
    config.json; left unset when the encoder is not on this machine)."""
    retriever = spec.retriever
    if retriever is None or "index" not in type(retriever).model_fields \
            or retriever.index.dim is not None:
        return spec
    try:
        dim = registry.build("embedder", retriever.embedder).dim
    except Exception:  # noqa: BLE001 - not readable here: the embed stage checks it
        return spec
    index = retriever.index.model_copy(update={"dim": dim})
    return spec.model_copy(update={"retriever": retriever.model_copy(update={"index": index})})


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
class RetroDBRecipe(BaseRecipe):
    """Only the retrieval database: tokens, chunk DB, index, neighbours of train/valid."""

    class Config(StrictModel):
        seq_length: int = Field(2048, ge=1)
        """Training sequence length in tokens (RETRO 2048, InstructRetro 4096)."""
        splits: list[Literal["train", "valid", "heldout"]] = ["train", "valid"]
        """Splits that get training sequences and neighbours ([] builds only the DB/index)."""


    def check(self, spec: Any) -> list[SpecIssue]:
        return db_spec_issues(spec)

    def resolve(self, spec: Any) -> Any:
        return resolve_db(spec)

    def stages(self, spec: Any) -> list[StageCall]:
        return db_stage_calls(spec, splits=self.config.splits)
