"""What the kNN-LM and in-context RALM evaluations share with `eval-ppl`: the scored tokens,
the per-sequence rows, bytes, and the results declaration that pairs them with its baseline."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from retro.components.evaluators.results import family
from retro.components.knnlm.config import PROTOCOL_FIELDS
from retro.platform.errors import UserError
from retro.platform.results import ItemSet, MetricDecl, Results, write_results
from retro.components.evaluators.ppl_inputs import token_byte_lengths


class SequenceRows:
    """Accumulates per_sequence.jsonl rows: {seq, nll, lm_nll, tokens, bytes, text_nll,
    lm_text_nll, ...}; `lm_*` is the same frozen LM without retrieval, from the same pass."""

    def __init__(self, out_dir: Any, tokenizer: Any):
        self.byte_lengths = token_byte_lengths(tokenizer)   # EOD and specials have no bytes
        self.fh = open(out_dir / "per_sequence.jsonl", "w")
        self.totals = {"nll": 0.0, "lm_nll": 0.0, "text_nll": 0.0, "lm_text_nll": 0.0,
                       "tokens": 0, "bytes": 0}

    def add(self, seq: int, targets: np.ndarray, nll: np.ndarray, lm_nll: np.ndarray,
            **extra: Any) -> None:
        text = self.byte_lengths[targets] > 0
        row = {"seq": int(seq), "nll": float(nll.sum()), "lm_nll": float(lm_nll.sum()),
               "tokens": int(len(targets)), "bytes": int(self.byte_lengths[targets].sum()),
               "text_nll": float(nll[text].sum()), "lm_text_nll": float(lm_nll[text].sum()),
               **extra}
        for k in self.totals:
            self.totals[k] += row[k]
        self.fh.write(json.dumps(row) + "\n")

    def summary(self) -> dict[str, Any]:
        self.fh.close()
        t = self.totals
        tokens, nbytes = max(t["tokens"], 1), max(t["bytes"], 1)
        return {"ppl": math.exp(t["nll"] / tokens), "loss": t["nll"] / tokens,
                "lm_ppl": math.exp(t["lm_nll"] / tokens),
                "bpb": t["text_nll"] / math.log(2) / nbytes,
                "lm_bpb": t["lm_text_nll"] / math.log(2) / nbytes,
                "tokens": t["tokens"], "bytes": t["bytes"]}


def declare(ctx: Any, cfg: Any, method: str) -> None:
    """results.json: the `ppl` family of the protocol fields, so a `ppl` node with equal
    split / max_sequences / batch_size / precision over the same model and sequences is this
    call's base (an ablation pair: condition {"retrieval": method} vs {})."""
    ppl_like = {"ppl": MetricDecl(aggregate="exp-ratio", num="nll", den="tokens",
                                  better="lower", headline=True),
                "bpb": MetricDecl(aggregate="ratio", num="text_nll", den="bytes",
                                  scale=1 / math.log(2), better="lower"),
                "loss": MetricDecl(aggregate="ratio", num="nll", den="tokens", better="lower"),
                "lm_ppl": MetricDecl(aggregate="exp-ratio", num="lm_nll", den="tokens",
                                     better="lower")}
    write_results(ctx.out_dir, Results(
        family=family("ppl", cfg, PROTOCOL_FIELDS), subject=["model"],
        condition={"retrieval": method}, reference=False,
        sets=[ItemSet(name=cfg.split, file="per_sequence.jsonl", id="seq", unit="sequences",
                      source=ctx.inputs["sequences"].key, metrics=ppl_like)]))


def check_vocab(lm: Any, tokenizer: Any, stage_name: str) -> None:
    vocab = lm.model.decoder.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise UserError(f"stage {stage_name}: the model's vocabulary ({vocab}) is smaller than "
                        f"the DB tokenizer's ({len(tokenizer)}): the spec's tokenizer must be "
                        "the LM's (e.g. tokenizer: {type: gguf, ...} for SmolLM2)")
