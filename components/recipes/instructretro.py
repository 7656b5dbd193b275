"""The InstructRetro recipe (DESIGN.md §2), the default recipe.

    corpus ─► tokenizer ─► tokenize ─► chunk-db ─► embed ─► train-index ─► fill-index
                                          └─► sequences-{train,valid} ─► neighbours-{train,valid}
    GPT (gpt-pretrain | import-gguf | model.init) ─► retro-fit (neighbours, freeze policy)
                                                  └► gpt-fit  (same tokens, no retrieval)
    retro-fit ─► instruct-retro          gpt-fit ─► instruct-gpt          (if `instruct:`)
    eval: ppl of retro-fit (encoder on / gate 0) and gpt-fit; QA of the instructed models
          (encoder on / off, passages on / off) and the retriever's answer recall.

Every stage reads only the spec fields it depends on, so a sweep over `model.freeze` shares the
retrieval DB, the GPT and everything before retro-fit.
"""

from __future__ import annotations

from typing import Any

from retro.platform.errors import SpecIssue
from retro.platform.registry import StrictModel, register
from retro.platform.stage import StageCall

# Model fields only the Retro parts use: a GPT stage never depends on them.
RETRO_ONLY = ("gate", "cca_layers", "encoder_layers", "encoder_rope", "retro_dropout")


@register("recipe", "instructretro", default=True)
class InstructRetroRecipe:
    """InstructRetro: retrieval DB, GPT, Retro-fit vs GPT-fit, instruction tuning, evaluation."""

    class Config(StrictModel):
        gpt_fit: bool = True
        """Train the GPT-fit control arm (same tokens and schedule, no retrieval)."""
        ppl_gate0: bool = True
        """Also score Retro-fit with the encoder bypassed (gate 0)."""
        qa_ablations: bool = True
        """QA with the encoder off and with passages off too (InstructRetro's ablations)."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def check(self, spec: Any) -> list[SpecIssue]:
        from retro.components.retrieval.recipe import db_spec_issues

        issues = db_spec_issues(spec)
        if spec.model is None or spec.model.type != "retro" or not spec.model.retro:
            issues.append(SpecIssue("model", "instructretro retro-fits a Retro model",
                                    hint="model: {type: retro, preset: retro-tiny}"))
        if spec.pretrain is None:
            issues.append(SpecIssue("pretrain", "instructretro needs the training schedules",
                                    hint="pretrain: {seq_length: 256, gpt: {steps: 100}, "
                                         "fit: {steps: 100}}"))
        for i, e in enumerate(spec.eval):
            if e.type == "ppl" and getattr(e, "split", "valid") != "valid":
                issues.append(SpecIssue(f"eval.{i}.split", "instructretro scores the valid "
                                        "split", value=e.split, has_value=True,
                                        hint="split: valid"))
        return issues

    def stages(self, spec: Any) -> list[StageCall]:
        from retro.components.retrieval.recipe import db_stage_calls

        calls = db_stage_calls(spec, seq_length="pretrain.seq_length")
        gpt = self._gpt(spec, calls)
        calls += self._fits(spec, gpt)
        models = {"retro": "retro-fit", "gpt": "gpt-fit" if self.config.gpt_fit else None}
        if spec.instruct is not None:
            for arm, fit in list(models.items()):
                if fit is not None:
                    calls.append(StageCall(f"instruct-{arm}", "instruct",
                                           reads={"instruct": "instruct"},
                                           inputs={"init": fit, "tokenizer": "tokenizer"},
                                           distributed=True))
                    models[arm] = f"instruct-{arm}"
        calls += self._evals(spec, models)
        return calls

    # -------------------------------------------------------------------------- pieces
    def _gpt(self, spec: Any, calls: list[StageCall]) -> str | None:
        """The call producing the initial GPT, or None when `model.init` names a directory."""
        if spec.model.init_gguf is not None:
            calls.append(StageCall("import-gguf", "import-gguf",
                                   reads={"source": "model.init_gguf"}))
            return "import-gguf"
        if spec.model.init is not None:
            return None
        calls.append(StageCall(
            "gpt-pretrain", "gpt-pretrain", reads={"model": "model", "pretrain": "pretrain"},
            omit={"model": (*RETRO_ONLY, "freeze"), "pretrain": ("fit",)},
            inputs={"sequences": "sequences-train", "valid_sequences": "sequences-valid",
                    "tokenizer": "tokenizer"}, distributed=True))
        return "gpt-pretrain"

    def _fits(self, spec: Any, gpt: str | None) -> list[StageCall]:
        init = {"init": gpt} if gpt else {}
        data = {"sequences": "sequences-train", "valid_sequences": "sequences-valid",
                "tokenizer": "tokenizer", **init}
        calls = [StageCall(
            "retro-fit", "retro-fit", reads={"model": "model", "pretrain": "pretrain"},
            omit={"pretrain": ("gpt",)},
            inputs={**data, "neighbours": "neighbours-train",
                    "valid_neighbours": "neighbours-valid", "chunk_db": "chunk-db",
                    "tokens": "tokenize", "quality": "retrieval-quality"}
            if spec.retriever.type != "bm25" else
            {**data, "neighbours": "neighbours-train", "valid_neighbours": "neighbours-valid",
             "chunk_db": "chunk-db", "tokens": "tokenize"},
            distributed=True)]
        if self.config.gpt_fit:
            calls.append(StageCall(
                "gpt-fit", "gpt-fit", reads={"model": "model", "pretrain": "pretrain"},
                omit={"model": RETRO_ONLY, "pretrain": ("gpt",)}, inputs=data,
                distributed=True))
        return calls

    def _evals(self, spec: Any, models: dict[str, str | None]) -> list[StageCall]:
        from retro.components.evaluators.ppl import eval_ppl_calls
        from retro.components.evaluators.qa import eval_qa_calls, qa_retrieve_call

        calls: list[StageCall] = []
        types = [e.type for e in spec.eval]
        for i, e in enumerate(spec.eval):
            path, sfx = f"eval.{i}", (f"-{i}" if types.count(e.type) > 1 else "")
            if e.type == "ppl":
                calls += eval_ppl_calls(path, "retro-fit", suffix=f"retro{sfx}",
                                        ablations=[{}, {"encoder": False}]
                                        if self.config.ppl_gate0 else [{}])
                if self.config.gpt_fit:
                    calls += eval_ppl_calls(path, "gpt-fit", suffix=f"gpt{sfx}",
                                            retro_model=False)
            elif e.type == "qa":
                retrieve = qa_retrieve_call(spec, path, name=f"qa-retrieve{sfx}")
                calls.append(retrieve)
                more = self.config.qa_ablations
                calls += eval_qa_calls(
                    path, models["retro"], contexts_call=retrieve.name, suffix=f"retro{sfx}",
                    ablations=[{}, {"encoder": False}, {"retrieval_context": False}]
                    if more else [{}])
                if models["gpt"]:
                    calls += eval_qa_calls(
                        path, models["gpt"], contexts_call=retrieve.name, suffix=f"gpt{sfx}",
                        retro_model=False,
                        ablations=[{}, {"retrieval_context": False}] if more else [{}])
        return calls
