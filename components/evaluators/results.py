"""The evaluators' per-item results, declared for `retro report` (`retro.platform.results`).

What the declarations say, so the report compares like with like:
- family: the evaluator kind + a hash of the node fields every call of it reads (not the
  ablation switches, not the fields only some calls read), so two `ppl` nodes of one spec stay
  apart while a Retro and a GPT call of the same node meet;
- subject: the input slots that hold what is evaluated (`model`; QA also `contexts`, so RA-DIT's
  fine-tuned retriever is a subject of its own);
- condition: the ablation switches the call sets ({}: the node as written, the base);
- reference: the model has no retrieval (a GPT): Retro arms are measured against it.

Per-item files: eval-ppl `per_sequence.jsonl` (seq, nll, tokens, bytes, ...), eval-qa
`predictions/<dataset>.jsonl` (id, em, f1, ...). Perplexity is pooled, exp(sum nll / sum
tokens), and its bootstrap resamples whole sequences (docs/evaluation.md).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Iterable

from retro.components.evaluators.ablation import ABLATIONS
from retro.platform.results import ItemSet, MetricDecl, Results, write_results


def condition(params: Any) -> dict[str, Any]:
    """The ablation switches a call sets (consts overriding its node)."""
    return {k: v for k in ABLATIONS if (v := getattr(params, k, None)) is not None}


def family(kind: str, cfg: Any, fields: Iterable[str]) -> str:
    """`<kind>/<hash>` of the node fields every call of this evaluator reads."""
    dumped = cfg.model_dump(mode="json")
    shared = {f: dumped.get(f) for f in fields if f not in ABLATIONS}
    digest = hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode())
    return f"{kind}/{digest.hexdigest()[:12]}"


def declare_ppl(ctx: Any, cfg: Any, is_retro: bool, fields: Iterable[str],
                bpb_num: str = "nll") -> None:
    """results.json of an eval-ppl artifact: per sequence, pooled ppl / bpb / loss.

    `bpb_num`: the column of NLL that counts towards bits per byte (the stage's bpb rule)."""
    write_results(ctx.out_dir, Results(
        family=family("ppl", cfg, fields), subject=["model"], condition=condition(ctx.params),
        reference=not is_retro,
        sets=[ItemSet(
            name=cfg.split, file="per_sequence.jsonl", id="seq", unit="sequences",
            source=ctx.inputs["sequences"].key, metrics={
                "ppl": MetricDecl(aggregate="exp-ratio", num="nll", den="tokens",
                                  better="lower", headline=True),
                "bpb": MetricDecl(aggregate="ratio", num=bpb_num, den="bytes",
                                  scale=1 / math.log(2), better="lower"),
                "loss": MetricDecl(aggregate="ratio", num="nll", den="tokens",
                                   better="lower")})]))


def declare_qa(ctx: Any, cfg: Any, is_retro: bool, fields: Iterable[str]) -> None:
    """results.json of an eval-qa artifact: per question EM and F1 (in %), per dataset."""
    write_results(ctx.out_dir, Results(
        family=family("qa", cfg, fields), subject=["model", "contexts"],
        condition=condition(ctx.params), reference=not is_retro,
        sets=[ItemSet(name=name, file=f"predictions/{name}.jsonl", id="id", unit="questions",
                      source=name, metrics={
                          "em": MetricDecl(value="em", scale=100, better="higher",
                                           headline=True),
                          "f1": MetricDecl(value="f1", scale=100, better="higher")})
              for name in cfg.datasets]))
