"""Zero-shot open-domain QA (InstructRetro §5.1): the `qa` evaluator and its two stages.

    qa-retrieve  questions -> top-k passages from the configured retriever, per dataset
                 (contexts/<dataset>.jsonl) and the retriever's answer recall@k. Needs no model,
                 so every model and ablation shares it.
    eval-qa      model (+ contexts) -> greedy answers in InstructRetro's prompt format,
                 EM / token F1 (SQuAD normalisation, max over golds, in %), per-example
                 predictions (predictions/<dataset>.jsonl).

Ablations (fields, or recipe consts that override them): `retrieval_context: false` is
closed-book: nothing retrieved reaches the model, neither prompt passages nor encoder neighbours
(then no `contexts` input is needed); `context_in_encoder_only: true` is the Shall-we paper's
"evidence only in the encoder" setting (no prompt passages, the encoder reads them); `encoder:
false` sets the CCA gate to 0 (InstructRetro's encoder bypass). With passages on and the encoder
on, a Retro model gets the question's top `encoder_neighbours` passages as the neighbours of
every chunk (Megatron's `--reuse-top`), EOD-padded as in training. Reading-comprehension
datasets (`squad_v2`) use their own paragraph instead of retrieved passages. Every prediction
records what the model received: `passage_ids` (prompt) and `encoder_passage_ids`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from pydantic import Field, model_validator

from retro.components.devices import stage_device
from retro.components.evaluators.metrics import answer_in_text, mean, qa_scores
from retro.components.evaluators.prompts import PromptFormat
from retro.components.evaluators.qa_data import FILES, DatasetName, load_questions
from retro.components.evaluators.ablation import EvalParams, ablation_call, evaluator_settings
from retro.components.evaluators.results import declare_qa
from retro.components.precision import Precision, inference_autocast, precision_info, \
    report_shard_precision, stage_precision
from retro.platform.errors import SpecIssue
from retro.platform.registry import StrictModel, register
from retro.platform.spec.node import NodeFields
from retro.platform.spec.types import DataPath
from retro.platform.stage import Pick, Slot, StageCall, StageContext, StageParams, stage
from dataclasses import asdict
from retro.components.evaluators.lm import find_model_dir, load_eval_lm
from retro.components.evaluators.prompts import (STOP_SEQUENCES, build_prompt, clean_answer,
                                                 format_passage)
from retro.components.models.retro.generation import generate_batch
from retro.components.retrieval.api import Retriever, retriever_inputs
from retro.components.retrieval.common import build_component

RETRIEVE_FIELDS = ("datasets", "data_dir", "limit", "answer_in_corpus", "retrieve_k")
# What an eval-qa call's result depends on (positive lists; a test checks every Config field
# is in one of them): always QA_FIELDS, and CONTEXT_FIELDS when it is wired with passages.
QA_FIELDS = ("datasets", "data_dir", "limit", "answer_in_corpus", "retrieval_context",
             "encoder", "prompt", "max_new_tokens", "max_prompt_tokens", "stop_at_newline",
             "precision", "batch_size")
CONTEXT_FIELDS = ("retrieve_k", "passages", "encoder_neighbours", "replug", "replug_temperature",
                  "context_in_encoder_only")


@register("evaluator", "qa")
class QAEvaluator:
    """Zero-shot open-domain QA: retrieved passages in the prompt, greedy answers, EM / F1."""

    class Config(StrictModel):
        datasets: list[DatasetName] = ["nq_open"]
        """Datasets under `data_dir`: nq_open, triviaqa_open, squad_v2 (answerable questions,
        reading comprehension: each answered from its own paragraph, InstructRetro Table 1's
        setting), squad_v2_open (the same questions answered from retrieved passages),
        webquestions, nq_open_oracle (NQ-open test questions with a gold passage)."""
        data_dir: DataPath
        """Folder holding the dataset folders (e.g. `${env:RETRO_DATA,../shared/data}`)."""
        limit: Optional[int] = Field(200, ge=1)
        """Questions per dataset, in file order (None: all)."""
        answer_in_corpus: bool = False
        """Keep only questions whose gold answer string occurs in the wiki_featured corpus
        (the datasets' `answer_in_wiki_featured` flag)."""
        retrieve_k: int = Field(20, ge=1)
        """Passages retrieved per question; answer recall is reported at 1, 5 and this k."""
        passages: int = Field(5, ge=0)
        """Top passages put in the prompt (InstructRetro: 5 for NQ / TriviaQA)."""
        encoder_neighbours: int = Field(2, ge=0)
        """Top passages fed to a Retro encoder as every chunk's neighbours (InstructRetro 48B:
        2); ignored for models without an encoder or with `encoder: false`."""
        retrieval_context: bool = True
        """Put the retrieved passages in the prompt (and, with `encoder`, in a Retro encoder);
        false: closed-book QA, nothing retrieved reaches the model."""
        context_in_encoder_only: bool = False
        """Passages in a Retro encoder only, none in the prompt (Shall-we's "evidence only in
        the encoder"); overrides `retrieval_context`."""
        encoder: bool = True
        """False: CCA gate 0, the encoder is bypassed (InstructRetro 43B setting)."""
        prompt: PromptFormat = "instructretro"
        """`instructretro`: System/User/Assistant text turns ending in "The answer is";
        `chat`: the same content through the tokenizer's chat template."""
        max_new_tokens: int = Field(32, ge=1)
        """Generation budget per answer (InstructRetro allows 256; short spans need few)."""
        max_prompt_tokens: int = Field(2048, ge=64)
        """Prompt + answer budget; the passages are cut to fit."""
        stop_at_newline: bool = True
        """End an answer at its first newline (short-span answers)."""
        replug: bool = False
        """REPLUG / RA-DIT inference: each of the top `passages` passages goes alone before the
        question ("Background: ..."), and greedy decoding follows the answers' mixture weighted
        by the retriever's renormalised scores (components/evaluators/replug.py); plain decoders."""
        batch_size: int = Field(8, ge=1)
        """Questions decoded together: one left-padded batch sharing a KV cache (each answer
        is what the question gets alone, up to float rounding at exact ties); REPLUG batches
        a question's passages instead."""
        replug_temperature: float = Field(0.1, gt=0)
        """REPLUG: softmax temperature over the passages' retriever scores."""
        precision: Precision = "auto"
        """Generation compute precision: `auto` (bf16 autocast where the hardware computes bf16
        fast: AMX / AVX512-BF16 CPUs, CUDA compute capability >= 8.0; else fp32), `bf16` or
        `fp32`; bf16 may change a greedy answer where two tokens nearly tie
        (docs/precision.md)."""

        @model_validator(mode="after")
        def _k(self) -> "QAEvaluator.Config":
            # a stage's narrowed copy (qa-retrieve reads `retrieve_k` only) skips this check
            # (platform/spec/node.py `narrowed`), so a whole node is always checked
            if max(self.passages, self.encoder_neighbours) > self.retrieve_k:
                raise ValueError(f"passages ({self.passages}) and encoder_neighbours "
                                 f"({self.encoder_neighbours}) must be <= retrieve_k "
                                 f"({self.retrieve_k})")
            return self

        def data_files(self) -> dict[str, tuple[str, ...]]:
            """Only the chosen datasets' files under `data_dir` enter stage keys."""
            return {"data_dir": tuple(FILES[name] for name in self.datasets)}

    def __init__(self, config: Config) -> None:
        self.config = config


def qa_retrieve_call(spec: Any, db: list[StageCall], eval_path: str,
                     name: str = "qa-retrieve", query_encoder: StageCall | None = None
                     ) -> StageCall:
    """The `qa-retrieve` call for the qa evaluator at `eval_path` (e.g. `eval.1`).

    Uses the spec's `retriever` over the retrieval DB calls `db` (those of
    `retro.components.retrieval.api.db_stage_calls`). One call serves every model.
    `query_encoder` (dense only): a call whose artifact holds a fine-tuned query encoder
    (RA-DIT's `lsr`), used for the questions instead of the embedder.
    """

    inputs = retriever_inputs(db)
    if query_encoder is not None:
        inputs["query_encoder"] = query_encoder
    return StageCall(name, "qa-retrieve", reads={"evaluator": Pick(eval_path, RETRIEVE_FIELDS),
                                                 "retriever": "retriever"}, inputs=inputs)


def eval_qa_calls(eval_path: str, model: StageCall, *, contexts: StageCall | None = None,
                  suffix: str = "", tokenizer: StageCall | None = None,
                  ablations: list[dict[str, bool]] | None = None, retro_model: bool = True
                  ) -> list[StageCall]:
    """`eval-qa` calls evaluating one model with the qa evaluator at `eval_path`.

    Args:
        eval_path: dotted path of the evaluator node, e.g. `eval.1`.
        model: the call producing the model folder (Retro checkpoint or HF model).
        contexts: the `qa-retrieve` call (None: closed-book only).
        suffix: model name in the call names: `eval-qa-<suffix>[-<ablation>]`.
        tokenizer: a call producing a tokenizer folder, when the model folder has none.
        ablations: one call per dict of overrides, e.g. [{}, {"encoder": False},
            {"retrieval_context": False}]; default [{}] (the node as written). Names get
            `-ctx-off`, `-encoder-off`, ...
        retro_model: the model may have an encoder (then the encoder's neighbours also come
            from the contexts); False lets closed-book calls skip the contexts input, so they
            are shared by every retriever variant.
    """
    calls = []
    for overrides in ablations or [{}]:
        needs = overrides.get("retrieval_context", True) or (
            retro_model and overrides.get("encoder", True)
            and overrides.get("context_in_encoder_only", False))
        inputs = {"model": model}
        if tokenizer is not None:
            inputs["tokenizer"] = tokenizer
        fields = QA_FIELDS
        if contexts is not None and needs:
            inputs["contexts"] = contexts
            fields += CONTEXT_FIELDS
        calls.append(ablation_call("eval-qa", suffix, overrides, eval_path, fields, inputs))
    return calls


def settings(params: EvalParams) -> QAEvaluator.Config:
    return evaluator_settings(params)


# ------------------------------------------------------------------------------ qa-retrieve

class QaRetrieveParams(StageParams):
    evaluator: NodeFields("evaluator", *RETRIEVE_FIELDS)
    """The qa node's question set and `retrieve_k`."""
    retriever: NodeFields("retriever", "embedder", "index", "stopwords")
    """What searching needs: the encoder and index (dense) or the stopwords (bm25)."""


@stage("qa-retrieve", version="2", params=QaRetrieveParams,
       estimate=lambda p: precision_info(p, "retriever", "embedder"),
       inputs={"tokenizer": "the DB tokenizer (tokenizer)", "tokens": "document tokens (tokenize)",
               "chunk_db": "the chunk table (chunk-db)",
               "index": Slot("dense retrievers: the filled index (fill-index)", optional=True),
               "bm25": Slot("bm25 retrievers: the BM25 index (bm25-index)", optional=True),
               "query_encoder": Slot("a fine-tuned query encoder (lsr)", optional=True)})
def qa_retrieve(ctx: StageContext[QaRetrieveParams]) -> dict[str, Any]:
    """Top-`retrieve_k` passages for every question, and answer recall@{1, 5, k}.

    Params: datasets, data_dir, limit, answer_in_corpus, retrieve_k (the evaluator's fields);
    retriever_type and embedder + index (dense) or stopwords (bm25) from the spec's retriever.
    Inputs: tokenizer, tokens, chunk_db and index (dense: fill-index) or bm25 (bm25-index), as
    `retro.components.retrieval.api.retriever_inputs(spec)` names them.
    Writes: contexts/<dataset>.jsonl ({id, question, answers, passages: [{chunk_id, doc_id,
    title, text, score}]}).
    """


    p = ctx.params.evaluator.model_dump(mode="json")
    node = ctx.params.retriever.model_dump(mode="json")
    retriever = Retriever.from_artifacts(node, ctx.inputs, query_encoder=_query_encoder(ctx))
    out = ctx.out_dir / "contexts"
    out.mkdir()
    summary: dict[str, Any] = {}
    ks = sorted({1, min(5, p["retrieve_k"]), p["retrieve_k"]})
    for name in p["datasets"]:
        examples = load_questions(p["data_dir"], name, p["limit"], p["answer_in_corpus"])
        t0 = time.time()
        with ctx.timer("search"):
            found_rows = retriever.search([e.question for e in examples], p["retrieve_k"])
        hits = [[asdict(ps) for ps in row] for row in found_rows]
        summary.update(write_contexts(out / f"{name}.jsonl", name, examples, hits, ks))
        ctx.log.info("%s: %d questions retrieved in %.1fs; recall %s", name, len(examples),
                     time.time() - t0, {k: round(summary[f'{name}/recall@{k}'], 1) for k in ks})
    report_shard_precision(ctx, [retriever.searcher.precision_report()])   # dense: the encoder
    return summary


def write_contexts(path: Path, name: str, examples: list, hits: list[list[dict[str, Any]]],
                   ks: list[int]) -> dict[str, Any]:
    """Write one dataset's retrieved passages (a `contexts/<dataset>.jsonl`: each question with
    its passages and the rank of the first holding an answer) and return its answer
    recall@k (%) for every k in `ks` and its question count."""
    found = []
    with open(path, "w") as fh:
        for ex, passages in zip(examples, hits):
            first = next((i for i, ps in enumerate(passages)
                          if answer_in_text(f"{ps['title']} {ps['text']}", ex.answers)), None)
            found.append(first)
            fh.write(json.dumps({**ex.to_json(), "answer_rank": first,
                                 "passages": passages}) + "\n")
    summary: dict[str, Any] = {f"{name}/recall@{k}": 100 * mean(f is not None and f < k
                                                                for f in found) for k in ks}
    summary[f"{name}/n"] = len(examples)
    return summary


def qa_only_issues(spec: Any, who: str, compares: str) -> list[SpecIssue]:
    """Spec issues of a recipe that compares its `compares` with `qa` evaluators only."""
    issues = []
    if not any(e.type == "qa" for e in spec.eval):
        issues.append(SpecIssue("eval", f"{who} compares its {compares} with a `qa` evaluator",
                                hint="eval: [{type: qa, data_dir: ...}]"))
    for i, e in enumerate(spec.eval):
        if e.type != "qa":
            issues.append(SpecIssue(f"eval.{i}", f"{who} runs qa evaluators only, not "
                                    f"{e.type!r}", value=e.type, has_value=True))
    return issues


def _query_encoder(ctx: StageContext) -> Any:
    """RA-DIT: the optional `query_encoder` input (an HF encoder folder, e.g. an `lsr` artifact)
    embeds the questions with the spec's pooling; the DB embeddings and index stay as built."""
    if "query_encoder" not in ctx.inputs:
        return None
    node = ctx.params.retriever.model_dump(mode="json")
    if "embedder" not in node:
        from retro.platform.errors import UserError

        raise UserError(f"stage {ctx.name}: a query_encoder input needs a dense retriever "
                        f"(retriever.type is {node['type']!r})")

    folder = find_model_dir(ctx.inputs["query_encoder"].path)
    return build_component("embedder", {**node["embedder"], "model": str(folder)}).embed


# ------------------------------------------------------------------------------ eval-qa

@stage("eval-qa", version="3", params=EvalParams,
       estimate=lambda p: precision_info(p, "evaluator"),
       inputs={"model": "the model folder (Retro checkpoint or HF model)",
               "tokenizer": Slot("a tokenizer folder, when the model folder has none",
                                 optional=True),
               "contexts": Slot("retrieved passages (qa-retrieve); needed with "
                                "retrieval_context", optional=True)})
def eval_qa(ctx: StageContext[EvalParams]) -> dict[str, Any]:
    """Greedy zero-shot answers, EM and token F1 (in %) per dataset.

    Params: `evaluator` (the qa node), optional consts `encoder`, `retrieval_context`.
    Inputs: `model` (Retro checkpoint or HF model folder), optional `tokenizer` (a folder with
    tokenizer.json, when the model has none), `contexts` (qa-retrieve output; required when
    `retrieval_context` is on).
    Writes: predictions/<dataset>.jsonl and scores.json. Predictions go to the work dir as they
    are made, so an interrupted run resumes at the next question.
    """

    cfg = settings(ctx.params)
    if _uses_passages(cfg) and "contexts" not in ctx.inputs:
        from retro.platform.errors import UserError

        raise UserError(f"stage {ctx.name}: retrieval_context is on but the recipe gave no "
                        "`contexts` input (a qa-retrieve stage); set retrieval_context: false "
                        "for closed-book QA")
    tok = ctx.inputs["tokenizer"].path if "tokenizer" in ctx.inputs else None
    device = stage_device(ctx)
    lm = load_eval_lm(ctx.inputs["model"].path, tok,
                      threads=max(1, int(ctx.resources.cpus_per_worker)), device=device)
    if not cfg.encoder:
        lm.set_gate(0.0)
    answer = answer_one
    if cfg.replug and cfg.retrieval_context and not cfg.context_in_encoder_only:  # RA-DIT
        from retro.components.evaluators.replug import answer_replug as answer
    work = ctx.work_dir / "predictions"  # written as we go: a re-run resumes from here
    work.mkdir(exist_ok=True)
    summary: dict[str, Any] = {}
    step = 0
    precision = stage_precision(ctx, cfg.precision, device)
    for name in cfg.datasets:
        rows = _examples(ctx, cfg, name)
        scores = _done(work / f"{name}.jsonl", len(rows))
        if scores:
            ctx.log.info("%s: resuming after %d answered questions", name, len(scores))
        with ctx.progress(len(rows), f"{ctx.name} {name}") as bar, \
                open(work / f"{name}.jsonl", "a") as fh:
            bar.update(len(scores))
            todo = rows[len(scores):]
            size = 1 if answer is not answer_one else cfg.batch_size  # REPLUG batches passages
            for a in range(0, len(todo), size):
                with ctx.timer("forward"), inference_autocast(lm.model, precision, device):
                    preds = (answer_batch(lm, cfg, todo[a:a + size]) if size > 1
                             else [answer(lm, cfg, todo[a])])
                for pred in preds:
                    scores.append(pred)
                    fh.write(json.dumps(pred) + "\n")
                    fh.flush()
                    bar.update(1)
                    if len(scores) % 25 == 0 or len(scores) == len(rows):
                        ctx.log_metrics(step=step, **{f"{name}/em_running":
                                                      100 * mean(s["em"] for s in scores)})
                        step += 1
        summary[f"{name}/em"] = 100 * mean(s["em"] for s in scores)
        summary[f"{name}/f1"] = 100 * mean(s["f1"] for s in scores)
        summary[f"{name}/n"] = len(scores)
        if cfg.retrieval_context and not cfg.context_in_encoder_only:
            summary[f"{name}/answer_in_prompt"] = 100 * mean(s["answer_in_prompt"]
                                                             for s in scores)
    shutil.copytree(work, ctx.out_dir / "predictions")
    (ctx.out_dir / "scores.json").write_text(json.dumps(
        {"settings": cfg.model_dump(mode="json"), "model_is_retro": lm.is_retro,
         "scores": summary}, indent=2))
    declare_qa(ctx, cfg, lm.is_retro, QA_FIELDS)  # per-question EM / F1 for `retro report`
    return summary


def _examples(ctx: StageContext, cfg: QAEvaluator.Config, name: str) -> list[dict[str, Any]]:
    """Questions (with passages when the prompt uses them), in the contexts' order."""
    if "contexts" in ctx.inputs:
        path = ctx.inputs["contexts"].file(f"contexts/{name}.jsonl")
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{**e.to_json(), "passages": []}
            for e in load_questions(cfg.data_dir, name, cfg.limit, cfg.answer_in_corpus)]


def _done(path: Path, n: int) -> list[dict[str, Any]]:
    """Predictions a previous attempt wrote (whole lines only), at most n."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break  # a line cut by the crash: redo from there
    rows = rows[:n]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def answer_one(lm: Any, cfg: QAEvaluator.Config, row: dict[str, Any]) -> dict[str, Any]:
    """Prompt, generate and score one question; returns the prediction record."""
    return answer_batch(lm, cfg, [row])[0]


def answer_batch(lm: Any, cfg: QAEvaluator.Config, rows: list[dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    """Prompt, generate (one left-padded, KV-cached batch) and score several questions; each
    record is what the question gets alone (greedy decoding of a row does not depend on the
    rows beside it, up to float rounding of masked padding)."""

    stops = STOP_SEQUENCES + (["\n"] if cfg.stop_at_newline else [])
    asks = [qa_prompt(lm, cfg, row) for row in rows]
    gens = generate_batch(lm.model, lm.tokenizer, [a["prompt"] for a in asks],
                          cfg.max_new_tokens, stops, retrieve=[a["retrieve"] for a in asks])
    records = []
    for row, ask, gen in zip(rows, asks, gens):
        raw = gen.text
        prediction = clean_answer(raw)
        passages, enc_passages, texts = ask["passages"], ask["enc_passages"], ask["texts"]
        records.append({
            "id": row["id"], "question": row["question"], "answers": row["answers"],
            "prediction": prediction, "raw": raw, **qa_scores(prediction, row["answers"]),
            "passage_ids": [passage_id(p) for p in passages],
            "encoder_passage_ids": [passage_id(p) for p in enc_passages],
            "answer_in_prompt": any(answer_in_text(t, row["answers"]) for t in texts),
            "prompt_tokens": len(ask["prompt"])})
    return records


def qa_prompt(lm: Any, cfg: QAEvaluator.Config, row: dict[str, Any]) -> dict[str, Any]:
    """What one question gives the model: prompt ids, its `retrieve` (Retro encoder) or None,
    and the passages behind them."""

    passages, enc_passages = model_inputs(lm, cfg, row)
    texts = [format_passage(p.get("title", ""), p["text"]) for p in passages]
    prompt = build_prompt(cfg.prompt, row["question"], texts, lm.tokenizer,
                          cfg.max_prompt_tokens, cfg.max_new_tokens)
    retrieve = encoder_neighbours(lm, enc_passages) if enc_passages else None
    return {"prompt": prompt, "retrieve": retrieve, "passages": passages,
            "enc_passages": enc_passages, "texts": texts}


def _uses_passages(cfg: QAEvaluator.Config) -> bool:
    return cfg.retrieval_context or cfg.context_in_encoder_only


def model_inputs(lm: Any, cfg: QAEvaluator.Config, row: dict[str, Any]
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(prompt passages, encoder passages) the model receives for one question.

    A reading-comprehension row (`context`: the dataset's own paragraph) uses that paragraph in
    place of the retrieved passages. Closed-book (`retrieval_context: false` without
    `context_in_encoder_only`) gets nothing; the encoder gets passages only for a Retro model
    with `encoder: true`.
    """
    source = [row["context"]] if row.get("context") else row.get("passages", [])
    if not _uses_passages(cfg):
        return [], []
    prompt = [] if cfg.context_in_encoder_only else source[:cfg.passages]
    encoder = source[:cfg.encoder_neighbours] if lm.is_retro and cfg.encoder else []
    return prompt, encoder


def passage_id(p: dict[str, Any]) -> Any:
    """A passage's DB chunk id, or the dataset's paragraph id for a gold context."""
    return p["chunk_id"] if p.get("chunk_id") is not None else p.get("paragraph_id")


def neighbour_block(tokenizer: Any, text: str, m: int, eod: int) -> list[list[int]]:
    """One passage as a Retro neighbour of 2m tokens, laid out as training lays out a DB chunk
    and its continuation (`ChunkDB.neighbour_tokens`): the first m tokens then the next m, each
    half right-padded with EOD (Megatron's padding, attended as in training and eval-ppl)."""
    ids = tokenizer.encode(text, add_special_tokens=False)[:2 * m]
    first, second = ids[:m], ids[m:]
    return first + [eod] * (m - len(first)) + second + [eod] * (m - len(second))


def encoder_neighbours(lm: Any, passages: list[dict[str, Any]]):
    """`retrieve(chunk_text) -> [k, 2m]`: the question's top passages for every chunk
    (Megatron's `--reuse-top`), as `neighbour_block`s."""
    eod = lm.tokenizer.eos_token_id
    if eod is None:
        from retro.platform.errors import InputDataError

        raise InputDataError(f"the tokenizer of {lm.path} has no eos token: Retro neighbours "
                             "are padded with it; save the tokenizer with an eos_token")
    block = [neighbour_block(lm.tokenizer, p["text"], lm.chunk_length, int(eod))
             for p in passages]

    def retrieve(chunk_text: str) -> list[list[int]]:
        return block

    return retrieve


def read_predictions(artifact_dir: Path, dataset: str) -> list[dict[str, Any]]:
    """The per-example records an eval-qa artifact saved for `dataset`."""
    path = Path(artifact_dir) / "predictions" / f"{dataset}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
