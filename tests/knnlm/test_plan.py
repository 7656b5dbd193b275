"""The `families` recipe plans each shared stage once: a lambda / k sweep reuses the kNN-LM
datastore and index; the key type does not."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml

from retro.platform.plan import build_plan
from retro.platform.spec import load_spec
from tests.conftest import SHARED_DATA


def _spec(tmp, sweep, retriever=None):
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": f"document {i} text"}) + "\n"
                              for i in range(20)))
    lm = tmp / "lm"
    lm.mkdir(exist_ok=True)
    (lm / "config.json").write_text("{}")
    spec = {"name": "families-plan", "recipe": {"type": "families", "seq_length": 32},
            "model": {"type": "hf-causal-lm", "init": str(lm)},
            "corpus": {"type": "jsonl", "paths": [str(corpus)]},
            "tokenizer": {"type": "gpt2-files", "path": str(SHARED_DATA / "tokenizer_gpt2")},
            "retriever": retriever or {"type": "bm25", "chunk_length": 16,
                                       "split": {"valid": 0.2, "heldout": 0.0}},
            "eval": [{"type": "ppl", "max_sequences": 8},
                     {"type": "knn-lm", "max_sequences": 8, "k": 16},
                     {"type": "in-context-ralm", "max_sequences": 8, "stride": 4}],
            **({"sweep": sweep} if sweep else {}), "tracking": "none",
            "store": {"path": str(tmp / "store"), "runs": str(tmp / "runs")}}
    path = tmp / "families-plan.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _count(plan):
    return Counter(s.stage for s in plan.stages)


def test_lambda_and_k_sweep_plan_the_datastore_and_index_once(tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    plan = build_plan(load_spec(_spec(tmp_path, {"grid": {"eval.1.lmbda": [0.1, 0.25, 0.5],
                                                          "eval.1.k": [8, 16]}})))
    n = _count(plan)
    assert n["eval-knnlm"] == 6
    assert n["knn-datastore"] == 1 and n["fill-index"] == 1 and n["train-index"] == 1
    assert n["eval-ppl"] == 1 and n["eval-ralm"] == 1 and n["sequences"] == 2
    store = next(s for s in plan.stages if s.stage == "knn-datastore")
    assert len(store.variants) == 6 and "lmbda" not in store.params and "k" not in store.params


def test_the_key_type_is_a_new_datastore(tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    plan = build_plan(load_spec(_spec(tmp_path, {"grid": {"eval.1.key": ["ffn_input",
                                                                         "final"]}})))
    n = _count(plan)
    assert n["knn-datastore"] == 2 and n["eval-knnlm"] == 2
    assert n["eval-ppl"] == 1 and n["eval-ralm"] == 1      # untouched by the kNN-LM sweep


def test_dense_ralm_reads_the_dense_index_and_knn_only_specs_skip_the_db_index(tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    dense = {"type": "dense", "chunk_length": 16, "split": {"valid": 0.2, "heldout": 0.0},
             "index": {"type": "faiss", "factory": "Flat", "dim": 384}}
    plan = build_plan(load_spec(_spec(tmp_path, None, dense)))
    ralm = next(s for s in plan.stages if s.stage == "eval-ralm")
    assert plan.by_id(ralm.inputs["index"]).name == "fill-index"      # the DB's, not kNN's
    n = _count(plan)
    assert n["embed"] == 1 and n["fill-index"] == 2                   # DB index + kNN index
    path = _spec(tmp_path, None)
    raw = yaml.safe_load(path.read_text())
    raw["eval"] = raw["eval"][:2]                                     # ppl + knn-lm only
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    n = _count(build_plan(load_spec(path)))
    assert n["bm25-index"] == 0 and n["knn-datastore"] == 1


def test_a_family_scored_differently_from_the_baseline_is_a_spec_error(tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    from retro.platform.errors import SpecError

    path = _spec(tmp_path, None)
    raw = yaml.safe_load(path.read_text())
    raw["eval"][1]["max_sequences"] = 16                # the ppl node scores 8
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert any(i.path == "eval.1" and "max_sequences" in i.message
               for i in err.value.issues)


def _retro_spec(tmp, **recipe):
    """All four families over the recipe's own GPT (a Retro model node + pretrain)."""
    path = _spec(tmp, None)
    raw = yaml.safe_load(path.read_text())
    raw["recipe"].update(recipe)
    raw["model"] = {"type": "retro", "preset": "retro-tiny", "overrides": {"d_model": 64}}
    raw["pretrain"] = {"seq_length": 32, "micro_batch": 2,
                       "gpt": {"steps": 2, "global_batch": 2}, "fit": {"steps": 2,
                                                                      "global_batch": 2}}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_four_families_share_one_gpt_one_db_and_one_set_of_sequences(tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    plan = build_plan(load_spec(_retro_spec(tmp_path)))
    n = _count(plan)
    # shared stages once: the DB, its BM25 index, the two sequence splits, the base GPT
    for stage in ("tokenizer", "tokenize", "chunk-db", "bm25-index", "gpt-pretrain"):
        assert n[stage] == 1, stage
    assert n["sequences"] == 2 and n["neighbours"] == 2
    assert n["retro-fit"] == 1 and n["gpt-fit"] == 1 and n["knn-datastore"] == 1
    assert n["eval-ralm"] == 1 and n["eval-knnlm"] == 1
    by_name = {s.name: s for s in plan.stages}
    gpt = by_name["gpt-pretrain"].id
    # one base LM: the no-retrieval baseline, RALM and kNN-LM score the pretrained GPT, and
    # retro-fit / gpt-fit start from it
    for name in ("eval-ppl", "eval-ralm", "knn-datastore", "eval-knnlm"):
        assert by_name[name].inputs["model"] == gpt, name
    for name in ("retro-fit", "gpt-fit"):
        assert by_name[name].inputs["init"] == gpt, name
    # the same held-out tokens for every family, the same train tokens for every training
    valid = {by_name[x].inputs["sequences"] for x in
             ("eval-ppl", "eval-ralm", "eval-knnlm", "eval-ppl-retro",
              "eval-ppl-retro-encoder-off", "eval-ppl-gpt-fit")}
    train = {by_name[x].inputs["sequences"] for x in
             ("gpt-pretrain", "retro-fit", "gpt-fit", "knn-datastore")}
    assert len(valid) == 1 and len(train) == 1 and valid != train
    # RALM's documents and RETRO's neighbours come from the same DB index
    assert by_name["eval-ralm"].inputs["bm25"] == by_name["neighbours-train"].inputs["bm25"]
    assert by_name["eval-ppl-retro"].inputs["model"] == by_name["retro-fit"].id
    assert "neighbours" not in by_name["eval-ppl-gpt-fit"].inputs


def test_without_gpt_fit_or_gate0_the_retro_arm_is_retro_fit_alone(tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    plan = build_plan(load_spec(_retro_spec(tmp_path, gpt_fit=False, ppl_gate0=False)))
    names = {s.name for s in plan.stages}
    assert "retro-fit" in names and "eval-ppl-retro" in names
    assert not names & {"gpt-fit", "eval-ppl-gpt-fit", "eval-ppl-retro-encoder-off"}


def test_a_retro_arm_trained_on_other_sequences_is_a_spec_error(tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    from retro.platform.errors import SpecError

    path = _retro_spec(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["pretrain"]["seq_length"] = 64                  # recipe.seq_length is 32
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert any(i.path == "pretrain.seq_length" for i in err.value.issues)
    del raw["pretrain"]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert any(i.path == "pretrain" for i in err.value.issues)
