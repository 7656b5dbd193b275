"""What the ppl and QA evaluators share: ablation switches turned into one stage call each.

An ablation (`{"encoder": False}`, `{"retrieval_context": True}`) becomes a stage-name tag, a
set of consts in the call's key, and an override of the evaluator node's fields at run time.
"""

from __future__ import annotations

from typing import Any, Optional

from retro.platform.spec.node import Node
from retro.platform.stage import Pick, StageCall, StageParams

ABLATIONS = ("encoder", "retrieval_context", "context_in_encoder_only")


def ablation_tag(overrides: dict[str, bool]) -> str:
    """`{"encoder": False, "retrieval_context": True}` -> "-encoder-off-ctx-on";
    `context_in_encoder_only: true` (passages in the encoder only) -> "-ctx-encoder-only"."""
    if overrides.get("context_in_encoder_only"):
        rest = {k: v for k, v in overrides.items()
                if k not in ("context_in_encoder_only", "retrieval_context")}
        return "-ctx-encoder-only" + ablation_tag(rest)
    overrides = {k: v for k, v in overrides.items() if k != "context_in_encoder_only"}
    return "".join(f"-{'ctx' if k == 'retrieval_context' else k}-{'on' if v else 'off'}"
                   for k, v in overrides.items())


class EvalParams(StageParams):
    """An evaluator stage's params: its node (only the fields the call depends on) and the
    ablation switches that override them."""

    evaluator: Node("evaluator")
    """The evaluator node."""
    encoder: Optional[bool] = None
    """Ablation: False sets the CCA gate to 0."""
    retrieval_context: Optional[bool] = None
    """Ablation: retrieved text in (True) or out of (False) the model's input."""
    context_in_encoder_only: Optional[bool] = None
    """Ablation (QA): passages reach the encoder only, never the prompt."""
    train_neighbours: Optional[int] = None
    """eval-ppl: neighbours per chunk the model trained with (`recipe.train_neighbours`), the
    encoder's default when the node's `neighbours` is unset."""


def ablation_call(stage: str, suffix: str, overrides: dict[str, bool], eval_path: str,
                  fields: tuple[str, ...], inputs: dict[str, StageCall],
                  reads: dict[str, str] | None = None) -> StageCall:
    """One evaluator stage call: reads the evaluator node's `fields` (the positive list of
    what this call's output depends on; an overridden field is a const instead), plus `reads`
    (param -> dotted spec path) from elsewhere in the spec."""
    return StageCall(f"{stage}{'-' + suffix if suffix else ''}{ablation_tag(overrides)}", stage,
                     reads={"evaluator": Pick(eval_path, tuple(f for f in fields
                                                               if f not in overrides)),
                            **(reads or {})},
                     consts=dict(overrides), inputs=inputs)


def evaluator_settings(params: EvalParams) -> Any:
    """The evaluator config of a stage: its node with the ablation consts applied."""
    return params.evaluator.model_copy(update={
        k: getattr(params, k) for k in ABLATIONS if getattr(params, k) is not None})
