"""Training stages: `gpt-pretrain`, `retro-fit`, `gpt-fit` (pretraining data) and `instruct`.

Each stage checks its inputs in the stage process (model vs checkpoint shapes, data shapes, the
blend), then trains on Ray Train (`launcher.launch`) with checkpoints in its work dir, and
writes a loadable model directory (`models.export`) as its artifact. Metrics stream to the
tracker every step (loss, lr, grad_norm, tokens_per_s) and every eval interval (val_loss,
val_ppl). See docs/training.md for params, input slots and files.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any, Optional

from retro.components.training.config import (ResolvedSchedule, resolve_schedule,
                                              run_settings)
from retro.components.training.data import NpyRows
from retro.components.training.loop import TrainJob
from retro.platform.errors import UserError
from retro.platform.spec.node import Node, NodeFields
from retro.platform.stage import Slot, StageContext, StageParams, stage
import json
from retro.components.models.retro.presets import get_preset
from retro.components.precision import precision_info
from retro.components.training.launcher import launch
from retro.components.training.models import (build_fresh, check_init, decoder_trainable,
                                              export as export_model, tokenizer_meta)
from retro.components.training.neighbours import DBNeighbours, neighbours_per_chunk

# What each stage's result depends on (positive lists): the decoder's dims and init for a GPT;
# the freeze policy too for gpt-fit (a frozen decoder does not train); everything for Retro.
DECODER = ("preset", "overrides", "init", "init_gguf")
TRAIN = ("seq_length", "micro_batch", "eval_interval", "eval_batches", "precision")


class GptPretrainParams(StageParams):
    model: NodeFields("model", *DECODER)
    """The decoder's dims and init."""
    pretrain: NodeFields("trainer", *TRAIN, "gpt")
    """The trainer settings and the `gpt` schedule."""


class RetroFitParams(StageParams):
    model: Node("model")
    """The whole model node: decoder, Retro encoder and CCA, freeze policy."""
    pretrain: NodeFields("trainer", *TRAIN, "fit")
    """The trainer settings and the `fit` schedule."""
    num_neighbours: Optional[int] = None
    """Neighbours per chunk fed to the encoder (the first n saved); None: all."""


class GptFitParams(StageParams):
    model: NodeFields("model", *DECODER, "freeze")
    """The decoder's dims and init, and the freeze policy."""
    pretrain: NodeFields("trainer", *TRAIN, "fit")
    """The trainer settings and the `fit` schedule (the same as retro-fit's)."""


DATA = {"sequences": "training sequences (sequences-train)",
        "valid_sequences": Slot("validation sequences (sequences-valid)", optional=True),
        "tokenizer": "the decoder tokenizer (tokenizer)"}
INIT = {"init": Slot("the GPT to continue from (gpt-pretrain, import-gguf); else model.init",
                     optional=True)}
RETRIEVAL = {"neighbours": "neighbours of the training sequences (neighbours-train)",
             "valid_neighbours": Slot("neighbours of the validation sequences", optional=True),
             "chunk_db": "the chunk table (chunk-db)", "tokens": "document tokens (tokenize)",
             "quality": Slot("the index recall check, to stop before training when it failed "
                             "(retrieval-quality)", optional=True)}


def _precision_estimate(params: Any) -> dict[str, str]:
    return precision_info(params, "pretrain")


# ------------------------------------------------------------------------------ stages
@stage("gpt-pretrain", version="2", params=GptPretrainParams, inputs=DATA, distributed=True,
       estimate=_precision_estimate)
def gpt_pretrain(ctx: StageContext[GptPretrainParams]) -> dict:
    """Train the plain decoder from scratch on the training sequences.

    Params: `model` (model node), `pretrain` (trainer node; schedule `pretrain.gpt`).
    Inputs: `sequences`, `valid_sequences`, `tokenizer`.
    Files: the model directory (see `models.export`).
    """

    node, trainer = ctx.params.model.model_dump(mode="json"), ctx.params.pretrain
    if node.get("init") or node.get("init_gguf") or node.get("type") == "hf-causal-lm":
        raise UserError("model.init is set: start from that checkpoint instead of running "
                        "gpt-pretrain (the recipe should skip this stage)")
    vocab, eod = _vocab(ctx)
    counts = check_init(node, vocab, 64, retro=False, init_dir=None)
    sched = resolve_schedule(trainer.gpt, trainer.seq_length, preset_defaults(node, "pretrain"))
    train, valid = _lm_rows(ctx, trainer.seq_length, eod)
    model = functools.partial(build_fresh, node, vocab, 64, retro=False, freeze=False)
    return _run(ctx, "gpt-pretrain", model, train, valid, sched, trainer, counts)


@stage("retro-fit", version="2", params=RetroFitParams, inputs={**DATA, **INIT, **RETRIEVAL},
       distributed=True, estimate=_precision_estimate)
def retro_fit(ctx: StageContext[RetroFitParams]) -> dict:
    """Continued pretraining of Retro initialised from the GPT (decoder weights), with each
    training sequence's precomputed neighbours (+ continuations) and `model.freeze`.

    Params: `model`, `pretrain` (schedule `pretrain.fit`), `num_neighbours` (int or None: all
    the artifact holds). Inputs: `sequences`, `valid_sequences`, `neighbours`,
    `valid_neighbours`, `chunk_db`, `tokens`, `tokenizer`, optional `init` (else `model.init`).
    """

    node, trainer = ctx.params.model.model_dump(mode="json"), ctx.params.pretrain
    if node.get("type", "retro") != "retro" or node.get("retro") is False:
        raise UserError("retro-fit needs a Retro model: model.type retro with retro: true")
    vocab, eod = _vocab(ctx)
    m = _chunk_length(ctx)
    init = _init_dir(ctx, node)
    counts = check_init(node, vocab, m, retro=True, init_dir=init)
    sched = resolve_schedule(trainer.fit, trainer.seq_length, preset_defaults(node, "retrofit"))
    train, valid = _lm_rows(ctx, trainer.seq_length, eod, neighbours=True,
                            k=ctx.params.num_neighbours)
    model = functools.partial(build_fresh, node, vocab, m, retro=True, init_dir=init)

    # recorded in training.json: eval-ppl scores the model with the k it trained with
    used = neighbours_per_chunk(ctx.inputs["neighbours"].path, ctx.params)
    return _run(ctx, "retro-fit", model, train, valid, sched, trainer, counts, chunk_length=m,
                extra={"num_neighbours": used})


@stage("gpt-fit", version="2", params=GptFitParams, inputs={**DATA, **INIT}, distributed=True,
       estimate=_precision_estimate)
def gpt_fit(ctx: StageContext[GptFitParams]) -> dict:
    """The control: continued pretraining of the GPT on the same sequences, schedule and seed
    as retro-fit, without retrieval. Under `model.freeze: frozen` (decoder frozen) nothing of a
    GPT trains, so the artifact is the initial GPT itself.

    Params: `model`, `pretrain` (schedule `pretrain.fit`).
    Inputs: `sequences`, `valid_sequences`, `tokenizer`, optional `init` (else `model.init`).
    """

    node, trainer = ctx.params.model.model_dump(mode="json"), ctx.params.pretrain
    vocab, eod = _vocab(ctx)
    init = _init_dir(ctx, node)
    sched = resolve_schedule(trainer.fit, trainer.seq_length, preset_defaults(node, "retrofit"))
    trains = decoder_trainable(node, vocab, 64)
    counts = check_init(node, vocab, 64, retro=False, init_dir=init) if trains else {}
    if not trains:
        sched = ResolvedSchedule(**{**sched.__dict__, "steps": 0})
        ctx.log.info("model.freeze leaves no decoder parameter trainable: gpt-fit is the "
                     "initial GPT, unchanged")
    train, valid = _lm_rows(ctx, trainer.seq_length, eod)
    model = functools.partial(build_fresh, node, vocab, 64, retro=False, init_dir=init,
                              freeze=trains)
    return _run(ctx, "gpt-fit", model, train, valid, sched, trainer, counts)


# ------------------------------------------------------------------------------ helpers
def preset_defaults(node: dict[str, Any], phase: str) -> dict[str, Any]:
    """The model preset's training values for `phase` (`pretrain`, `retrofit`, `sft`), as
    Schedule fields, with warmup, decay and length in samples (as the papers and Megatron
    give them) so `resolve_schedule` rescales them with the resolved batch; {} when the model
    has no preset (dims from a checkpoint)."""

    name = node.get("preset")
    if name is None and not (node.get("init") or node.get("init_gguf")) \
            and node.get("type", "retro") == "retro":
        name = "retro-tiny"                       # the model's own default dims
    hp = get_preset(name).training.get(phase) if name else None
    if hp is None:
        return {}
    gb = hp.global_batch
    out: dict[str, Any] = {
        "global_batch": gb, "lr": hp.lr, "min_lr": hp.min_lr, "decay": hp.decay_style,
        "weight_decay": hp.weight_decay, "betas": tuple(hp.adam_betas),
        "grad_clip": hp.clip_grad}
    if hp.samples:
        out["samples"] = hp.samples
    elif hp.steps:
        out["samples"] = hp.steps * gb
    elif hp.tokens:
        out["tokens"] = int(hp.tokens)
    if hp.warmup_samples is not None:
        out["warmup_samples"] = hp.warmup_samples
    if hp.decay_samples:
        out["decay_samples"] = hp.decay_samples
    return out


def _vocab(ctx: Any) -> tuple[int, int]:
    meta = tokenizer_meta(ctx.inputs["tokenizer"].path)
    return int(meta["vocab_size"]), int(meta["eod_id"])


def _chunk_length(ctx: Any) -> int:
    return int(json.loads((ctx.inputs["chunk_db"].path / "meta.json").read_text())
               ["chunk_length"])


def _init_dir(ctx: Any, node: dict[str, Any]) -> Optional[str]:
    if "init" in ctx.inputs:
        return str(ctx.inputs["init"].path)
    if node.get("init"):
        return str(node["init"])
    raise UserError("no GPT to continue from: give model.init (a checkpoint directory) or let "
                    "the recipe run gpt-pretrain and pass it as input `init`")


def _lm_rows(ctx: Any, seq_length: int, eod: int, *, neighbours: bool = False,
             k: Optional[int] = None) -> tuple[NpyRows, Optional[NpyRows]]:
    """Train/valid row recipes over `sequences` artifacts (and their neighbours)."""

    out = []
    for seq_slot, nb_slot in (("sequences", "neighbours"), ("valid_sequences",
                                                             "valid_neighbours")):
        if seq_slot not in ctx.inputs:
            out.append(None)
            continue
        path = ctx.inputs[seq_slot].path
        meta = json.loads((path / "meta.json").read_text())
        if meta["seq_length"] != seq_length:
            raise UserError(f"pretrain.seq_length is {seq_length} but the {seq_slot} artifact "
                            f"holds sequences of {meta['seq_length']} tokens; make them agree")
        nb = None
        if neighbours:
            nb = functools.partial(db_neighbours,
                                   str(ctx.inputs[nb_slot].path / "neighbours.npy"),
                                   str(ctx.inputs["chunk_db"].path),
                                   str(ctx.inputs["tokens"].path), k)
        out.append(NpyRows(str(path / "tokens.npy"), seq_length, neighbours=nb, pad_id=eod))
    if out[0] is None:
        raise UserError("training stage without `sequences` input: the recipe must pass them")
    return out[0], out[1]


def db_neighbours(ids_path: str, chunk_db_path: str, tokens_path: str,
                  k: Optional[int]) -> Any:
    """A `DBNeighbours` built in the worker (this partial is what pickles)."""

    return DBNeighbours(ids_path, chunk_db_path, tokens_path, k)


def _run(ctx: Any, kind: str, model: Any, train: Any, valid: Any, sched: ResolvedSchedule,
         run: Any, counts: dict[str, Any], *, chunk_length: int = 64,
         export: Any = None, extra: Optional[dict[str, Any]] = None) -> dict:
    """Launch the job on the stage's resources, forward metrics, move the model into place."""

    meta = {"stage": kind, "schedule": sched.values(), "seed": ctx.seed,
            "seq_length": train.seq_length, "chunk_length": chunk_length, **(extra or {})}
    export = export or functools.partial(
        export_model, tokenizer_dir=str(ctx.inputs["tokenizer"].path), meta=meta)
    job = TrainJob(name=ctx.name, model=model, train_data=train, val_data=valid,
                   schedule=sched, run=run_settings(run, ctx.resources), seed=ctx.seed, out_dir=str(ctx.work_dir / "job"),
                   export=export)
    res = ctx.resources
    ctx.log.info("%s: %s; %d workers; params %s", kind, sched.summary(), res.num_workers,
                 counts)
    summary = launch(job, num_workers=res.num_workers, cpus_per_worker=res.cpus_per_worker,
                     gpus_per_worker=res.gpus_per_worker, storage=ctx.work_dir,
                     on_row=functools.partial(_forward, ctx, sched.steps, {}))
    ctx.add_times(summary.pop("time_s", None))     # the rank-0 worker's split
    with ctx.timer("io"):
        for item in job.final_dir.iterdir():
            shutil.move(str(item), str(Path(ctx.out_dir) / item.name))
    return {**summary, **{f"params_{k}": v for k, v in counts.items()},
            "global_batch": sched.global_batch, "lr": sched.lr}


def _forward(ctx: Any, steps: int, progress: dict[str, Any], row: dict[str, Any]) -> None:
    """Metrics rows -> the stage's metrics (and trackers); progress lines in the stage log."""
    kind, step = row.get("kind"), int(row.get("step", 0))
    if kind == "resume":
        ctx.log.info("resumed from the checkpoint at step %d", step)
        ctx.summary["resumed_from"] = step
        progress.pop("bar", None)  # rows before this one replay the earlier attempt's history
        return
    if kind == "precision":
        from retro.components.precision import report_precision

        report_precision(ctx, row)
        return
    if kind == "train":
        note = (f"loss {row.get('loss', float('nan')):.4f}, "
                f"{row.get('tokens_per_s', 0.0):.0f} tokens/s")
        if "bar" not in progress:  # the clock starts at the first step (workers may wait for CPUs)
            progress["bar"] = ctx.progress(steps, f"{ctx.name} steps", every_s=30.0, start=step)
            progress["bar"].update(0, note)
        else:
            progress["bar"].update(1, note)
    elif kind == "eval":
        ctx.log.info("%s step %d/%d val_loss %.4f val_ppl %.1f", ctx.name, step, steps,
                     row.get("val_loss", float("nan")), row.get("val_ppl", float("nan")))
    keys = ("loss", "lr", "grad_norm", "tokens_per_s") if kind == "train" \
        else ("val_loss", "val_ppl")
    ctx.log_metrics(step=step, **{k: row[k] for k in keys if k in row})

