"""What the ppl and QA evaluators share: ablation switches turned into one stage call each.

An ablation (`{"encoder": False}`, `{"retrieval_context": True}`) becomes a stage-name tag, a
set of consts in the call's key, and an override of the evaluator node's fields at run time.
"""

from __future__ import annotations

from typing import Any

from retro.platform.registry import registry
from retro.platform.stage import StageCall

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


def ablation_call(stage: str, suffix: str, overrides: dict[str, bool], eval_path: str,
                  omit: tuple[str, ...], inputs: dict[str, str]) -> StageCall:
    """One evaluator stage call: reads the evaluator node, minus the `omit` fields its output
    cannot depend on, with the ablation's overrides as consts."""
    return StageCall(f"{stage}{'-' + suffix if suffix else ''}{ablation_tag(overrides)}", stage,
                     reads={"evaluator": eval_path}, consts=dict(overrides),
                     omit={"evaluator": tuple(overrides) + omit}, inputs=inputs)


def evaluator_settings(kind: str, params: dict[str, Any]) -> Any:
    """The evaluator config of a stage: its `evaluator` node with the ablation consts applied."""
    node = registry.get("evaluator", kind).node_model().model_validate(params["evaluator"])
    return node.model_copy(update={k: params[k] for k in ABLATIONS if k in params})
