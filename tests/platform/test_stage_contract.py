"""The declared stage contract (issue 12): recipes wire declared slots with handles, keys cover
exactly the declared params, and execution settings never enter a key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retro.platform.plan import build_plan
from retro.platform.spec import load_spec
from retro.platform.errors import SpecError

from tests.platform.helpers import cli, toy_spec

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "specs" / "retro-tiny.yaml"


@pytest.mark.parametrize("miswire, words", [
    ("misspelled-slot", ["'total'", "'numbrs'", "does not declare", "did you mean 'numbers'"]),
    ("missing-slot", ["'total'", "misses required input slot 'numbers'"]),
])
def test_validate_rejects_a_recipe_that_miswires_a_stage(tmp_path, miswire, words):
    spec = toy_spec(tmp_path, recipe={"type": "toy", "miswire": miswire})
    res = cli("validate", spec, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    for w in words:
        assert w in res.stderr, (w, res.stderr)
    assert "recipe 'toy'" in res.stderr and "stage 'toy-total'" in res.stderr


def _keys(*overrides: str) -> dict[str, str]:
    plan = build_plan(load_spec(TINY, list(overrides)))
    return {s.name: s.key for s in plan.stages}


def test_execution_settings_never_change_a_key():
    base = _keys()
    assert _keys("resources.default.max_failures=0",
                 "resources.default.checkpoint_interval=7",
                 "resources.stages.retro-fit={num_workers: 2, fsdp: true}") == base


def test_a_learning_rate_rekeys_its_stage_and_what_follows_it_only():
    base, changed = _keys(), _keys("pretrain.fit.lr=0.002")
    moved = {name for name in base if base[name] != changed[name]}
    # retro-fit and gpt-fit train on the `fit` schedule; everything downstream of them moves
    assert {"retro-fit", "gpt-fit"} <= moved
    assert all(n.startswith(("eval-", "instruct-")) for n in moved - {"retro-fit", "gpt-fit"})
    assert {n for n in base if n.startswith(("eval-ppl", "eval-qa", "instruct-"))} <= moved
    untouched = {"tokenizer", "tokenize", "chunk-db", "embed", "train-index", "fill-index",
                 "retrieval-quality", "sequences-train", "sequences-valid", "neighbours-train",
                 "neighbours-valid", "gpt-pretrain", "qa-retrieve"}
    assert untouched <= set(base) and not (untouched & moved)


def test_resources_of_a_stage_merge_over_the_default():
    plan = build_plan(load_spec(TINY, ["resources.stages.retro-fit={num_workers: 2}"]))
    fit = next(s for s in plan.stages if s.name == "retro-fit")
    assert fit.resources.num_workers == 2 and fit.resources.checkpoint_interval == 40


def test_every_field_of_the_evaluators_is_classified_for_keys():
    """Positive key lists: a new evaluator field fails here until its list names it."""
    from retro.components.evaluators import ppl, qa

    assert set(ppl.PplEvaluator.Config.model_fields) == \
        set(ppl.PPL_FIELDS + ppl.NEIGHBOUR_FIELDS + ppl.CONTEXT_FIELDS)
    assert set(qa.QAEvaluator.Config.model_fields) == set(qa.QA_FIELDS + qa.CONTEXT_FIELDS)


def test_plan_json_params_are_the_stage_params_model(tmp_path):
    """What the key covers is what the stage receives: `ctx.params` is the params model."""
    from retro.platform.registry import registry

    plan = build_plan(load_spec(TINY))
    for s in plan.stages:
        sdef = registry.get("stage", s.stage).obj
        assert sdef.params.model_validate(s.params).model_dump(mode="json") == s.params
        assert set(s.inputs) <= set(sdef.inputs) and set(sdef.required) <= set(s.inputs)
    json.dumps(plan.to_json())


# A null in resolved.yaml is allowed only where it means "none / off / the other form was
# given" — never for a value the run derives and uses (torchtune: every value in the YAML).
NULL_MEANS_NONE = {
    "retriever.embedder.model": "the packaged MiniLM encoder (keyed by package + files)",
    "retriever.index.train_size": "no cap on the training sample",
    "retriever.index.ef_search": "HNSW only; this index has no HNSW",
    "retriever.quality.min_recall": "no minimum recall",
    "model.init": "no checkpoint: gpt-pretrain makes the GPT",
    "model.init_gguf": "no GGUF checkpoint",
    "tracking.0.entity": "the W&B default entity",
    "tracking.0.dir": "the run folder",
}
OTHER_FORM = ("samples", "tokens", "warmup_samples", "decay_samples")   # steps/warmup/decay_steps
EXECUTION = ("resources.", "sweep", "lock")


def _nulls(value, path=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _nulls(v, f"{path}{k}.")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _nulls(v, f"{path}{i}.")
    elif value is None:
        yield path[:-1]


def test_resolved_spec_of_the_tiny_run_holds_every_value_it_uses():
    from retro.platform.runs import resolved

    data = resolved(load_spec(TINY).spec)
    left = [p for p in _nulls(data) if p not in NULL_MEANS_NONE and not p.startswith(EXECUTION)
            and not (p.startswith("pretrain.") and p.rsplit(".", 1)[1] in OTHER_FORM)
            and not (p.startswith("instruct.blend.") and p.rsplit(".", 1)[1] in
                     ("samples", "epochs", "template"))]
    assert left == []
    assert data["recipe"]["train_neighbours"] == data["retriever"]["neighbours"]["k"]
    assert data["pretrain"]["fit"]["decay_steps"] == data["pretrain"]["fit"]["steps"]
    assert data["model"]["cca_layers"] and data["eval"][0]["neighbours"] == 2


def test_the_resolved_spec_plans_to_the_same_keys(tmp_path):
    """Resolution is idempotent: resolved.yaml re-run is the same experiment."""
    import yaml

    from retro.platform.runs import resolved

    loaded = load_spec(TINY)
    again = tmp_path / "resolved.yaml"
    again.write_text(yaml.safe_dump(resolved(loaded.spec), sort_keys=False))
    assert [s.key for s in build_plan(load_spec(again)).stages] == \
        [s.key for s in build_plan(loaded).stages]


def test_a_narrowed_node_holds_only_its_fields_and_skips_cross_field_checks():
    """qa-retrieve depends on `retrieve_k` only: a spec with retrieve_k 4 and passages 2 is
    valid, and the narrowed node (passages back at its default 5 > 4) must not fail."""
    from pydantic import BaseModel

    from retro.platform.registry import registry
    from retro.platform.spec.node import PICKED, NodeFields

    registry.load_plugins()

    class P(BaseModel):
        qa: NodeFields("evaluator", "retrieve_k", "data_dir")

    p = P.model_validate({"qa": {"type": "qa", "data_dir": "/d", "retrieve_k": 4,
                                 "passages": 2}})
    assert p.qa.retrieve_k == 4 and p.qa.passages == 5          # unpicked: the default
    dumped = p.model_dump(mode="json")["qa"]
    assert dumped == {"type": "qa", "data_dir": "/d", "retrieve_k": 4, PICKED: True}
    assert P.model_validate({"qa": dumped}).model_dump(mode="json")["qa"] == dumped


def test_a_narrowed_node_validates_the_defaults_a_whole_node_would():
    """An unpicked field whose default is validated (the retriever's `embedder: {}`) is the
    validated node, as in a whole node, not the raw `{}`."""
    from pydantic import BaseModel

    from retro.platform.registry import registry
    from retro.platform.spec.node import NodeFields

    registry.load_plugins()

    class P(BaseModel):
        r: NodeFields("retriever", "chunk_length")

    p = P.model_validate({"r": {"type": "dense", "chunk_length": 32}})
    whole = registry.get("retriever", "dense").node_model().model_validate({"type": "dense"})
    assert p.r.chunk_length == 32 and p.r.embedder == whole.embedder
