"""The InstructRetro recipe (DESIGN.md §2), the default recipe.

    corpus ─► tokenizer ─► tokenize ─► chunk-db ─► embed ─► train-index ─► fill-index
                                          └─► sequences-{train,valid} ─► neighbours-{train,valid}
    GPT (gpt-pretrain | import-gguf | model.init) ─► retro-fit (neighbours, freeze policy)
                                                  └► gpt-fit  (same tokens, no retrieval)
    retro-fit ─► instruct-retro          gpt-fit ─► instruct-gpt          (if `instruct:`)
    eval: ppl of retro-fit (encoder on / gate 0) and gpt-fit; QA of the instructed models
          (encoder on / off, passages on / off = closed-book, passages in the encoder only)
          and the retriever's answer recall.

Every stage reads only the spec fields it depends on, so a sweep over `model.freeze` shares the
retrieval DB, the GPT and everything before retro-fit.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field

from retro.platform.errors import SpecIssue, UserError
from retro.platform.registry import StrictModel, register
from retro.components.retrieval.recipe import call
from retro.platform.stage import BaseRecipe, StageCall
from retro.components.evaluators.ppl import eval_ppl_calls
from retro.components.evaluators.qa import eval_qa_calls, qa_retrieve_call
from retro.components.instruct.holdout import qa_eval_sets
from retro.components.models.retro.build import count_parameters, estimate as model_estimate
from retro.components.recipes.cost import (CostAssumption, gpu_hours, paper_fit_hours,
                                           training_flops)
from retro.components.recipes.memory import memory_info
from retro.components.retrieval.recipe import (db_spec_issues, db_stage_calls, resolve_db,
                                               retriever_inputs)
from retro.components.training.config import Schedule, resolve_schedule
from retro.components.training.stages import preset_defaults
from retro.platform.units import human



@register("recipe", "instructretro", default=True)
class InstructRetroRecipe(BaseRecipe):
    """InstructRetro: retrieval DB, GPT, Retro-fit vs GPT-fit, instruction tuning, evaluation."""

    class Config(StrictModel):
        gpt_fit: bool = True
        """Train the GPT-fit control arm (same tokens and schedule, no retrieval)."""
        ppl_gate0: bool = True
        """Also score Retro-fit with the encoder bypassed (gate 0)."""
        qa_ablations: bool = True
        """QA with the encoder off and with passages off too (InstructRetro's ablations)."""
        train_neighbours: Optional[int] = Field(None, ge=1)
        """Neighbours per chunk fed to retro-fit, the first of the `retriever.neighbours.k`
        saved (Megatron: 2 of 20); None: all saved."""

    def estimate(self, spec: Any, name: str, params: Any) -> dict[str, Any]:
        k = spec.recipe.train_neighbours or (spec.retriever.neighbours.k
                                             if spec.retriever is not None else None)
        return {**estimate_training(spec, name, params),
                **memory_info(spec, name, _vocab_size(spec), k)}

    def resolve(self, spec: Any) -> Any:
        """Write out what the stages would otherwise derive: the neighbours Retro trains and is
        scored with, the CCA layout, both training schedules (preset values converted with the
        resolved batch), the SFT floor LR and the in-context window."""

        spec = resolve_db(spec)
        k = self.config.train_neighbours or spec.retriever.neighbours.k
        update: dict[str, Any] = {"recipe": spec.recipe.model_copy(
            update={"train_neighbours": k})}
        model = spec.model
        dims = model.dims() if model.type == "retro" else None
        if dims is not None and model.retro and not isinstance(model.cca_layers, list):
            update["model"] = model.model_copy(
                update={"cca_layers": model.resolved_cca_layers(dims.n_layers)})
        if spec.pretrain is not None:
            node = model.model_dump(mode="json")
            seq = spec.pretrain.seq_length
            phases = {name: resolve_schedule(getattr(spec.pretrain, name), seq,
                                             preset_defaults(node, phase))
                      for name, phase in (("gpt", "pretrain"), ("fit", "retrofit"))}
            update["pretrain"] = spec.pretrain.model_copy(update={
                name: Schedule(steps=r.steps, global_batch=r.global_batch, lr=r.lr,
                               min_lr=r.min_lr, warmup=r.warmup_steps, decay=r.decay,
                               decay_steps=r.decay_steps, weight_decay=r.weight_decay,
                               betas=r.betas, grad_clip=r.grad_clip)
                for name, r in phases.items()})
        if spec.instruct is not None and getattr(spec.instruct, "min_lr", 0) is None:
            update["instruct"] = spec.instruct.model_copy(update={"min_lr": spec.instruct.lr})
        evals = []
        for e in spec.eval:
            if e.type == "ppl":
                fill = {"neighbours": e.neighbours or k}
                if e.context_window is None and spec.pretrain is not None:
                    fill["context_window"] = spec.pretrain.seq_length
                e = e.model_copy(update=fill)
            evals.append(e)
        update["eval"] = evals
        return spec.model_copy(update=update)

    def check(self, spec: Any) -> list[SpecIssue]:
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
        db = db_stage_calls(spec, seq_length="pretrain.seq_length")
        calls = list(db)
        gpt = self._gpt(spec, db)
        if gpt is not None:
            calls.append(gpt)
        fits = self._fits(spec, db, gpt)
        calls += fits.values()
        models: dict[str, StageCall | None] = {"retro": fits["retro"], "gpt": fits.get("gpt")}
        if spec.instruct is not None:
            models = self._instruct(spec, db, models)
            calls += [m for m in models.values() if m is not None]
        calls += self._evals(spec, db, fits, models)
        return calls

    # -------------------------------------------------------------------------- pieces
    def _gpt(self, spec: Any, db: list[StageCall]) -> StageCall | None:
        """The call producing the initial GPT, or None when `model.init` names a directory."""
        if spec.model.init_gguf is not None:
            return StageCall("import-gguf", "import-gguf", reads={"source": "model.init_gguf"})
        if spec.model.init is not None:
            return None
        return StageCall("gpt-pretrain", "gpt-pretrain",
                         reads={"model": "model", "pretrain": "pretrain"},
                         inputs={"sequences": call(db, "sequences-train"),
                                 "valid_sequences": call(db, "sequences-valid"),
                                 "tokenizer": call(db, "tokenizer")})

    def _fits(self, spec: Any, db: list[StageCall], gpt: StageCall | None
              ) -> dict[str, StageCall]:
        data = {"sequences": call(db, "sequences-train"),
                "valid_sequences": call(db, "sequences-valid"),
                "tokenizer": call(db, "tokenizer"), **({"init": gpt} if gpt else {})}
        retrieval = {"neighbours": call(db, "neighbours-train"),
                     "valid_neighbours": call(db, "neighbours-valid"),
                     "chunk_db": call(db, "chunk-db"), "tokens": call(db, "tokenize")}
        quality = [c for c in db if c.name == "retrieval-quality"]   # dense retrievers only
        if quality:
            retrieval["quality"] = quality[0]
        fits = {"retro": StageCall("retro-fit", "retro-fit",
                                   reads={"model": "model", "pretrain": "pretrain",
                                          "num_neighbours": "recipe.train_neighbours"},
                                   inputs={**data, **retrieval})}
        if self.config.gpt_fit:
            fits["gpt"] = StageCall("gpt-fit", "gpt-fit",
                                    reads={"model": "model", "pretrain": "pretrain"}, inputs=data)
        return fits

    def _instruct(self, spec: Any, db: list[StageCall], models: dict[str, StageCall | None]
                  ) -> dict[str, StageCall | None]:
        """SFT of each arm; with `instruct.retrieval` the Retro arm also searches the DB."""

        out: dict[str, StageCall | None] = {}
        for arm, fit in models.items():
            if fit is None:
                out[arm] = None
                continue
            reads = {"instruct": "instruct"}
            inputs = {"init": fit, "tokenizer": call(db, "tokenizer")}
            if spec.instruct.retrieval and arm == "retro":
                reads["retriever"] = "retriever"
                inputs.update(retriever_inputs(db))
            # RA-DIT's rule: no SFT record asks a question the QA evaluation asks
            out[arm] = StageCall(f"instruct-{arm}", "instruct", reads=reads, inputs=inputs,
                                 consts={"exclude_questions": qa_eval_sets(spec)})
        return out

    def _evals(self, spec: Any, db: list[StageCall], fits: dict[str, StageCall],
               models: dict[str, StageCall | None]) -> list[StageCall]:
        calls: list[StageCall] = []
        types = [e.type for e in spec.eval]
        for i, e in enumerate(spec.eval):
            path, sfx = f"eval.{i}", (f"-{i}" if types.count(e.type) > 1 else "")
            if e.type == "ppl":
                calls += eval_ppl_calls(path, fits["retro"], db, suffix=f"retro{sfx}",
                                        ablations=[{}, {"encoder": False}]
                                        if self.config.ppl_gate0 else [{}],
                                        train_neighbours="recipe.train_neighbours")
                if self.config.gpt_fit:
                    calls += eval_ppl_calls(path, fits["gpt"], db, suffix=f"gpt{sfx}",
                                            retro_model=False)
            elif e.type == "qa":
                retrieve = qa_retrieve_call(spec, db, path, name=f"qa-retrieve{sfx}")
                calls.append(retrieve)
                more = self.config.qa_ablations
                calls += eval_qa_calls(
                    path, models["retro"], contexts=retrieve, suffix=f"retro{sfx}",
                    # closed-book (-ctx-off: nothing retrieved) and passages in the encoder
                    # only (-ctx-encoder-only, Shall-we's "evidence only in the encoder")
                    ablations=[{}, {"encoder": False}, {"retrieval_context": False},
                               {"retrieval_context": False, "context_in_encoder_only": True}]
                    if more else [{}])
                if models["gpt"]:
                    calls += eval_qa_calls(
                        path, models["gpt"], contexts=retrieve, suffix=f"gpt{sfx}",
                        retro_model=False,
                        ablations=[{}, {"retrieval_context": False}] if more else [{}])
        return calls


# ------------------------------------------------------------------------------ plan info
TRAINING = {"gpt-pretrain": ("gpt", "pretrain"), "retro-fit": ("fit", "retrofit"),
            "gpt-fit": ("fit", "retrofit")}


def estimate_training(spec: Any, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Parameters (counted on the meta device), the resolved schedule (`resolve_schedule`, as
    the stage will run it), tokens and FLOPs-based GPU-hours of a training stage, for
    `retro plan`. Empty for other stages."""
    if name not in TRAINING:
        return {}


    schedule, phase = TRAINING[name]
    node = spec.model.model_copy(update={"retro": name == "retro-fit"})
    if node.preset is not None:  # the preset fixes the dims: no need to open the checkpoint
        node = node.model_copy(update={"init": None, "init_gguf": None})
    chunk = spec.retriever.chunk_length
    try:
        info = model_estimate(node, _vocab_size(spec), chunk)
        counts = _counts(node, _vocab_size(spec), chunk)
    except UserError as e:  # dims come from a checkpoint that is not here
        return {"params": f"unknown ({str(e).split(';')[0]})"}
    sched = resolve_schedule(getattr(spec.pretrain, schedule), spec.pretrain.seq_length,
                             preset_defaults(node.model_dump(mode="json"), phase))
    info = {**info, "schedule": sched.summary()}
    tokens = sched.tokens
    k = (spec.recipe.train_neighbours or spec.retriever.neighbours.k) if name == "retro-fit" \
        else 0
    flops = training_flops(counts["total"] - counts["encoder"], tokens, counts["encoder"],
                           k, 2 * chunk, chunk)
    assumption = CostAssumption()
    info = {**info, "tokens": human(tokens),
            "gpu_hours": f"{gpu_hours(flops, assumption):,.0f} ({assumption.text()})"}
    paper = paper_fit_hours(spec.model.preset, name == "retro-fit") if phase == "retrofit" \
        else None
    return {**info, "paper": paper} if paper else info


def _counts(node: dict[str, Any], vocab: int | None, chunk: int) -> dict[str, int]:
    return count_parameters(node, vocab, chunk)


def _vocab_size(spec: Any) -> int | None:
    """The decoder vocabulary: a trained BPE's size, GPT-2's, or None (the preset's own)."""
    kind = spec.tokenizer.type if spec.tokenizer is not None else None
    if kind == "train-bpe":
        return spec.tokenizer.vocab_size
    if kind == "gpt2-files":
        return 50257
    return None

