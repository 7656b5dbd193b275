"""Held-out perplexity and bits per byte: the `ppl` evaluator and its `eval-ppl` stage.

Every model scores the same tokens: tokens 1..n-1 of each held-out sequence (the `sequences`
artifact of the `valid` split, whose documents are not in the retrieval DB). A Retro model reads
the sequence's neighbours (the `neighbours` artifact of that split: k DB chunks per chunk, with
every document of the sequence excluded, as in training) through its encoder: the first k, k
being what the model trained with (`ppl_inputs`), EOD padding attended as in training.

Ablations (fields, or recipe consts that override them):
- `encoder: false` sets the CCA gate to 0 (the decoder alone; InstructRetro's encoder bypass).
- `retrieval_context: true` puts retrieved text in the *prompt* instead (in-context RAG, for any
  model): chunk j (j >= 1) is scored after the text of the top `context_neighbours` neighbours
  (+ continuations, padding dropped) of chunk j-1, followed by the preceding tokens of the
  sequence that fit `context_window` (default: the sequence length, the baseline's window);
  decoder only: no encoder input. Chunk 0 is scored as usual, so the scored tokens stay the
  same.

bits per byte (RETRO's): NLL of the targets that spell document text / ln 2 / the UTF-8 bytes
they spell, counted per token from the DB tokenizer's vocabulary; EOD targets count in loss and
ppl only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
from pydantic import Field

from retro.components.evaluators.ablation import EvalParams, ablation_call, evaluator_settings
from retro.components.evaluators.results import declare_ppl
from retro.components.precision import (Precision, inference_autocast, precision_info,
                                         stage_precision)
from retro.platform.registry import StrictModel, register
from retro.platform.stage import Slot, StageCall, StageContext, stage
from retro.components.devices import stage_device
from retro.components.evaluators.lm import find_model_dir, load_eval_lm, token_nll
from retro.components.evaluators.ppl_inputs import (in_context_prompt, text_targets,
                                                    token_byte_lengths, trained_neighbours)
from retro.components.retrieval.api import Sequences, load_tokenizer
from retro.components.training.neighbours import DBNeighbours
from retro.platform.errors import UserError

# What an eval-ppl call's result depends on, by what it is wired with (positive lists; a test
# checks every Config field is in one of them).
PPL_FIELDS = ("split", "max_sequences", "batch_size", "encoder", "retrieval_context",
              "precision")
NEIGHBOUR_FIELDS = ("neighbours",)
CONTEXT_FIELDS = ("context_neighbours", "context_window")



@register("evaluator", "ppl")
class PplEvaluator:
    """Held-out perplexity and bits per byte; Retro reads same-DB neighbours (doc-excluded)."""

    class Config(StrictModel):
        split: str = "valid"
        """Sequences/neighbours split the recipe wires in (`valid` or `heldout`)."""
        max_sequences: Optional[int] = Field(256, ge=1)
        """Score at most this many sequences (the first ones; None: all). The report's
        bootstrap CI of a ppl delta narrows as 1/sqrt(sequences)."""
        batch_size: int = Field(4, ge=1)
        """Sequences per forward pass."""
        neighbours: Optional[int] = Field(None, ge=1)
        """Neighbours per chunk given to the encoder (the first n of the artifact's k; None:
        all)."""
        encoder: bool = True
        """False: CCA gate 0, the encoder is bypassed."""
        retrieval_context: bool = False
        """Prepend the previous chunk's retrieved neighbours to the context of every chunk."""
        context_neighbours: int = Field(1, ge=1)
        """Neighbours (+ continuation) prepended per chunk with `retrieval_context`."""
        context_window: Optional[int] = Field(None, ge=1)
        """With `retrieval_context`: tokens of retrieved text + preceding sequence tokens +
        the scored chunk at most; the sequence is cut from the left to fit. None: the sequence
        length, the window of the no-RAG baseline (same context budget for both)."""
        precision: Precision = "auto"
        """Model compute precision: `auto` (bf16 autocast where the hardware computes bf16 fast:
        AMX / AVX512-BF16 CPUs, CUDA compute capability >= 8.0; else fp32), `bf16` or `fp32`;
        NLLs are summed in float64 either way (docs/precision.md)."""

    def __init__(self, config: Config) -> None:
        self.config = config


def eval_ppl_calls(eval_path: str, model: StageCall, db: list[StageCall], *,
                   split: str = "valid", suffix: str = "",
                   ablations: list[dict[str, bool]] | None = None, retro_model: bool = True,
                   train_neighbours: str | None = None) -> list[StageCall]:
    """`eval-ppl` calls for one model with the ppl evaluator at `eval_path` (e.g. `eval.0`).

    Args:
        eval_path: dotted path of the evaluator node.
        model: the call producing the model folder.
        db: the calls of `retrieval.api.db_stage_calls(spec, splits=(..., split))`; wires
            `sequences-<split>`, `tokenizer` and, when neighbours are used,
            `neighbours-<split>`, `chunk-db`, `tokenize`.
        split: the sequences split (must match the node's `split`).
        suffix: model name in the call names: `eval-ppl-<suffix>[-<ablation>]`.
        ablations: one call per dict of overrides, e.g. [{}, {"encoder": False}].
        retro_model: the model may read neighbours (else they are not wired for encoder-on
            calls, so a GPT's ppl does not depend on the retriever).
        train_neighbours: dotted spec path of the neighbours per chunk the model trained with
            (e.g. `recipe.train_neighbours`): the encoder's k unless the node sets
            `neighbours` (None there: the model's training.json, else all the artifact holds).
    """
    by_name = {c.name: c for c in db}
    calls = []
    for overrides in ablations or [{}]:
        inputs = {"model": model, "sequences": by_name[f"sequences-{split}"],
                  "tokenizer": by_name["tokenizer"]}
        in_context = overrides.get("retrieval_context", False)
        fields, reads = PPL_FIELDS, {}
        encoder = retro_model and overrides.get("encoder", True)
        if in_context or encoder:
            inputs |= {"neighbours": by_name[f"neighbours-{split}"],
                       "chunk_db": by_name["chunk-db"], "tokens": by_name["tokenize"]}
            fields += NEIGHBOUR_FIELDS
            if encoder and not in_context and train_neighbours:
                reads["train_neighbours"] = train_neighbours
        if overrides.get("retrieval_context", True):   # the node may turn it on
            fields += CONTEXT_FIELDS
        calls.append(ablation_call("eval-ppl", suffix, overrides, eval_path, fields, inputs,
                                   reads))
    return calls


def settings(params: EvalParams) -> PplEvaluator.Config:
    return evaluator_settings(params)


_NB = "with neighbours (Retro encoder or retrieval_context): "


def _estimate(params: EvalParams) -> dict[str, Any]:
    return precision_info(params, "evaluator")


@stage("eval-ppl", version="3", params=EvalParams, estimate=_estimate,
       inputs={"model": "the model folder (a training stage)",
               "sequences": "held-out sequences (sequences-valid)",
               "tokenizer": "the DB tokenizer, for bytes (tokenizer)",
               "neighbours": Slot(_NB + "their neighbours (neighbours-valid)", optional=True),
               "chunk_db": Slot(_NB + "the chunk table (chunk-db)", optional=True),
               "tokens": Slot(_NB + "document tokens (tokenize)", optional=True)})
def eval_ppl(ctx: StageContext[EvalParams]) -> dict[str, Any]:
    """Perplexity, mean NLL (nats/token) and bits per byte of one model on held-out sequences.

    Params: `evaluator` (the ppl node), optional consts `encoder`, `retrieval_context`.
    Inputs: `model`, `sequences` (a sequences artifact), `tokenizer` (the DB tokenizer, for
    bytes); with neighbours: `neighbours`, `chunk_db`, `tokens`.
    Writes: per_sequence.jsonl ({seq, nll, tokens, bytes}) and scores.json.
    """
    import torch


    cfg = settings(ctx.params)
    seqs = Sequences(ctx.inputs["sequences"])
    tokenizer = load_tokenizer(ctx.inputs["tokenizer"])
    lm = load_eval_lm(ctx.inputs["model"].path, ctx.inputs["tokenizer"].path,
                      threads=max(1, int(ctx.resources.cpus_per_worker)),
                      device=stage_device(ctx))
    if not cfg.encoder:
        lm.set_gate(0.0)
    source = _neighbour_source(ctx, cfg)

    if cfg.retrieval_context and source is None:
        raise UserError(f"stage {ctx.name}: retrieval_context needs `neighbours`, `chunk_db` "
                        "and `tokens` inputs")
    vocab = lm.model.decoder.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise UserError(f"stage {ctx.name}: the model's vocabulary ({vocab}) is smaller than the "
                        f"DB tokenizer's ({len(tokenizer)}): perplexity needs a model that uses "
                        "the spec's tokenizer")
    if source is not None and lm.is_retro and source.db.chunk_length != lm.chunk_length:
        raise UserError(f"stage {ctx.name}: the model's chunk length is {lm.chunk_length} but "
                        f"the neighbours were built with retriever.chunk_length = "
                        f"{source.db.chunk_length}; they must agree")
    n = min(len(seqs), cfg.max_sequences or len(seqs))
    total_nll, total_tokens, total_bytes = 0.0, 0, 0

    byte_lengths = token_byte_lengths(tokenizer)   # document bytes per token; EOD has none
    text_nll = 0.0
    device = stage_device(ctx)
    precision = stage_precision(ctx, cfg.precision, device)
    with ctx.progress(n, ctx.name) as bar, open(ctx.out_dir / "per_sequence.jsonl", "w") as fh, \
            inference_autocast(lm.model, precision, device):
        for start in range(0, n, cfg.batch_size):
            rows = np.arange(start, min(n, start + cfg.batch_size))
            with ctx.timer("io"):
                toks = torch.from_numpy(np.asarray(seqs.tokens[rows], dtype=np.int64))
                nb_tokens = source.tokens(rows) if source is not None and (
                    cfg.retrieval_context or (lm.is_retro and cfg.encoder)) else None
            if cfg.retrieval_context:
                with ctx.timer("forward"):
                    nll = _in_context_nll(lm, toks, nb_tokens, source.db.chunk_length, cfg)
            else:
                nb = None
                if nb_tokens is not None:
                    nb = torch.from_numpy(nb_tokens)  # [b, chunks, k, 2m]
                    nb = nb[:, : -(-(toks.shape[1] - 1) // lm.chunk_length)]
                with ctx.timer("forward"):
                    nll = token_nll(lm, toks[:, :-1], toks[:, 1:], nb)  # [b, n-1]
            for i, row in enumerate(rows):
                targets = toks[i, 1:].numpy()
                s_nll, s_bytes = float(nll[i].sum()), int(byte_lengths[targets].sum())
                s_text_nll = float(nll[i][torch.from_numpy(text_targets(targets,
                                                                        byte_lengths))].sum())
                text_nll += s_text_nll
                fh.write(json.dumps({"seq": int(row), "nll": s_nll,
                                     "tokens": int(toks.shape[1] - 1), "bytes": s_bytes,
                                     "text_nll": s_text_nll}) + "\n")
                total_nll += s_nll
                total_tokens += toks.shape[1] - 1
                total_bytes += s_bytes
            ctx.log_metrics(step=int(rows[-1]) + 1, running_ppl=math.exp(total_nll / total_tokens))
            bar.update(len(rows))
    loss = total_nll / total_tokens
    summary = {"loss": loss, "ppl": math.exp(loss),
               "bpb": text_nll / math.log(2) / max(total_bytes, 1),
               "tokens": total_tokens, "bytes": total_bytes, "sequences": n,
               "uses_neighbours": bool(source is not None and lm.is_retro and cfg.encoder
                                       and not cfg.retrieval_context)}
    (ctx.out_dir / "scores.json").write_text(json.dumps(
        {"settings": cfg.model_dump(mode="json"), "model_is_retro": lm.is_retro,
         "scores": summary}, indent=2))
    declare_ppl(ctx, cfg, lm.is_retro, PPL_FIELDS, bpb_num="text_nll")  # for `retro report`
    return summary


def _neighbour_source(ctx: StageContext, cfg: PplEvaluator.Config) -> Any:
    if not {"neighbours", "chunk_db", "tokens"} <= set(ctx.inputs):
        return None


    # what the model trained with (the recipe's `train_neighbours`, else retro-fit's record in
    # training.json) unless the node says otherwise
    k = cfg.neighbours or getattr(ctx.params, "train_neighbours", None) or trained_neighbours(
        find_model_dir(Path(ctx.inputs["model"].path)))
    return DBNeighbours(str(ctx.inputs["neighbours"].path), str(ctx.inputs["chunk_db"].path),
                        str(ctx.inputs["tokens"].path), k)


def _in_context_nll(lm: Any, toks: Any, nb_tokens: np.ndarray, m: int,
                    cfg: PplEvaluator.Config) -> Any:
    """NLL [b, n-1] of tokens 1..n-1, chunk j >= 1 (of the DB's chunk length m) scored after
    the text of chunk j-1's neighbours (EOD padding dropped) and the preceding sequence tokens
    that fit the window (`ppl_inputs.in_context_prompt`)."""
    import torch


    b, n = toks.shape
    pad_id = int(lm.tokenizer.eos_token_id)       # the DB tokenizer's EOD: the chunks' padding
    window = cfg.context_window or n
    out = torch.zeros(b, n - 1, dtype=torch.float64)
    first = min(m, n)
    out[:, : first - 1] = token_nll(lm, toks[:, : first - 1], toks[:, 1:first])
    for j in range(1, -(-n // m)):
        lo, hi = j * m, min((j + 1) * m, n)
        prompts, targets = [], []
        for i in range(b):
            prompts.append(in_context_prompt(toks[i].tolist(), lo, hi,
                                             nb_tokens[i, j - 1, : cfg.context_neighbours],
                                             pad_id, window))
            targets.append(toks[i, lo:hi].tolist())
        width = max(len(p) + len(t) for p, t in zip(prompts, targets))
        ids = torch.zeros(b, width, dtype=torch.long)
        labels = torch.full((b, width), -1, dtype=torch.long)
        for i, (p, t) in enumerate(zip(prompts, targets)):
            seq = p + t
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p) - 1: len(p) - 1 + len(t)] = torch.tensor(t)  # right padding
        nll = token_nll(lm, ids, labels)
        for i, (p, t) in enumerate(zip(prompts, targets)):
            out[i, lo - 1: hi - 1] = nll[i, len(p) - 1: len(p) - 1 + len(t)]
    return out
