"""The `instruct` stage: supervised instruction tuning of a trained model on a blend.

Before training: every source is loaded and checked (format, fields, emptiness), the blend is
realized (samples per source, held-out records, content hashes) and rendered into token rows +
answer-only loss masks in the work dir. Then the model trains like the pretraining stages, with
retrieval gated off unless `instruct.retrieval` is true.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Optional

from retro.platform.errors import UserError
from retro.platform.spec.node import Node
from retro.platform.stage import Slot, StageContext, StageParams, stage
import numpy as np
from retro.components.instruct.blend import realize, write_rows
from retro.components.instruct.holdout import drop_eval_questions, eval_questions
from retro.components.instruct.sources import load_source
from retro.components.precision import precision_info
from retro.components.retrieval.api import Retriever
from retro.components.tokenizers.stage import load_tokenizer
from retro.components.training.data import NpyRows
from retro.components.training.models import export, load_trained, tokenizer_meta
from retro.components.training.neighbours import retrieve_for_rows
from retro.components.training.stages import _run, db_neighbours


class InstructParams(StageParams):
    instruct: Node("instruct")
    """The instruct node: blend and SFT hyper-parameters."""
    retriever: Optional[Node("retriever")] = None
    """With `instruct.retrieval: true`: the retriever that searches the DB."""
    exclude_questions: list[dict[str, Any]] = []
    """QA evaluation sets ({data_dir, datasets, limit, answer_in_corpus}) whose questions the
    blend must not train on (`instruct.holdout`)."""


def _precision_estimate(params: Any) -> dict[str, str]:
    return precision_info(params, "instruct")


_DB = "with instruct.retrieval on: "


@stage("instruct", version="2", params=InstructParams, distributed=True,
       estimate=_precision_estimate,
       inputs={"init": "the model to tune (retro-fit, gpt-fit)",
               "tokenizer": "the decoder tokenizer (tokenizer)",
               "tokens": Slot(_DB + "document tokens (tokenize)", optional=True),
               "chunk_db": Slot(_DB + "the chunk table (chunk-db)", optional=True),
               "index": Slot(_DB + "the dense index (fill-index)", optional=True),
               "bm25": Slot(_DB + "the BM25 index (bm25-index)", optional=True)})
def instruct(ctx: StageContext[InstructParams]) -> dict:
    """Instruction-tune the `init` model (a retro-fit or gpt-fit artifact) on `instruct.blend`.

    Params: `instruct` (the instruct node); with `instruct.retrieval: true` also `retriever`
    (the retriever node). Inputs: `init` (model directory), `tokenizer`; with retrieval on also
    `tokens`, `chunk_db` and `index` (dense) or `bm25`.
    Files: the model directory (`models.export`: decoder/ + tokenizer, retro_config.json,
    retro.safetensors, training.json holding the realized blend).
    """

    cfg = ctx.params.instruct
    init = Path(ctx.inputs["init"].path)
    retro_cfg = _retro_config(init)
    retrieval = cfg.retrieval and retro_cfg.get("retro", True)   # a GPT has nothing to feed
    retriever = _retriever(ctx) if retrieval else None           # missing inputs fail here
    seq_length = cfg.seq_length or _context_length(retro_cfg)
    loaded = [load_source(node) for node in cfg.blend]          # every data error, up front

    loaded, excluded = drop_eval_questions(cfg.blend, loaded,
                                           eval_questions(ctx.params.exclude_questions))
    if excluded:
        ctx.log.info("blend: %d records ask a QA evaluation question and are left out", excluded)
    sched = cfg.schedule()
    parts = realize(cfg.blend, loaded, sched.steps * sched.global_batch, cfg.eval_samples,
                    ctx.seed)
    tok = load_tokenizer(ctx.inputs["tokenizer"].path)
    eod = int(tokenizer_meta(ctx.inputs["tokenizer"].path)["eod_id"])
    tokenize = functools.partial(tok.encode, add_special_tokens=False)
    data = ctx.work_dir / "blend"
    data.mkdir(parents=True, exist_ok=True)
    stats = {which: write_rows(parts, loaded, which, data / which, tokenize, eod, seq_length,
                               cfg.system) for which in ("train", "eval")}
    blend = [p.summary() for p in parts]
    for part in blend:
        ctx.log.info("blend: %s", part)
    neighbours = {which: _neighbours(ctx, retriever, tok, data / which, seq_length,
                                     int(retro_cfg["chunk_length"]), eod)
                  if retrieval else None for which in ("train", "eval")}
    train = NpyRows(str(data / "train_tokens.npy"), seq_length,
                    loss_mask=str(data / "train_mask.npy"), pad_id=eod,
                    neighbours=neighbours["train"])
    valid = NpyRows(str(data / "eval_tokens.npy"), seq_length,
                    loss_mask=str(data / "eval_mask.npy"), pad_id=eod,
                    neighbours=neighbours["eval"]) if stats["eval"]["rows"] else None
    meta = {"stage": "instruct", "schedule": sched.__dict__, "seed": ctx.seed,
            "seq_length": seq_length, "blend": blend, "rows": stats, "retrieval": retrieval,
            "excluded_eval_questions": excluded}
    model = functools.partial(load_trained, str(init), retrieval=retrieval)
    out = functools.partial(export, tokenizer_dir=str(ctx.inputs["tokenizer"].path), meta=meta,
                            gate=float(retro_cfg.get("gate", 1.0)))
    ctx.summary["blend"] = blend
    summary = _run(ctx, "instruct", model, train, valid, sched, cfg, {}, export=out)
    return {**summary, "blend_samples": stats["train"]["rows"],
            "excluded_eval_questions": excluded,
            "truncated": stats["train"]["truncated"], "loss_tokens": stats["train"]["loss_tokens"]}


def _retriever(ctx: Any) -> Any:
    """The DB retriever for SFT with retrieval on (the spec's `retriever` and the DB stages)."""

    if ctx.params.retriever is None:
        raise UserError("instruct.retrieval: true needs the recipe to pass the `retriever` "
                        "section and the DB artifacts (tokens, chunk_db, index or bm25) to "
                        "the instruct stage")
    return Retriever.from_artifacts(ctx.params.retriever.model_dump(mode="json"), ctx.inputs)


def _neighbours(ctx: Any, retriever: Any, tokenizer: Any, prefix: Path, seq_length: int,
                chunk_length: int, eod: int) -> Any:
    """Retrieve every chunk's neighbours of the rendered rows once, before training; returns
    the worker-side reader."""


    k = ctx.params.retriever.neighbours.k
    tokens = np.load(f"{prefix}_tokens.npy", mmap_mode="r")
    ids = retrieve_for_rows(retriever, tokenizer, tokens, seq_length, chunk_length, k, eod)
    np.save(f"{prefix}_neighbours.npy", ids)
    ctx.log.info("%s: retrieved neighbours for %d rows (%.0f%% of slots filled)",
                 prefix.name, len(ids), 100 * float((ids >= 0).mean()) if ids.size else 0)
    return functools.partial(db_neighbours, f"{prefix}_neighbours.npy",
                             str(ctx.inputs["chunk_db"].path), str(ctx.inputs["tokens"].path), k)


def _retro_config(path: Path) -> dict[str, Any]:
    f = path / "retro_config.json"
    if not f.is_file():
        raise UserError(f"instruct: input `init` at {path} is not a trained model directory "
                        "(no retro_config.json); pass a retro-fit or gpt-fit artifact")
    return json.loads(f.read_text())


def _context_length(retro_cfg: dict[str, Any]) -> int:
    dec = retro_cfg.get("decoder", {})
    n = dec.get("n_positions") or dec.get("max_position_embeddings")
    if not n:
        raise UserError("instruct.seq_length: the model does not state its context length; "
                        "set instruct.seq_length")
    return int(n)
