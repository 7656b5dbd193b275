"""The `ra-dit` recipe end to end on a local Ray with tiny real models, then the `lsr` stage
again inline on the run's artifacts to check what it may and may not touch.

Setup: 40 real Wikipedia passages (nq_open_oracle gold passages, 32-token chunks), a random
tiny BERT as the dual encoder (the DB is embedded with it), a random tiny Llama as the LM, the
oracle questions as training pairs and the first 4 of them as the QA test set.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from retro.platform import api
from retro.platform.report import build_report
from tests.conftest import SHARED_DATA
from tests.evaluation.helpers import artifacts_by_name, as_artifact, metrics_rows, stage_ctx
from tests.radit.helpers import (oracle_corpus, oracle_questions, sha256_tree, tiny_bert,
                                 tiny_lm)

VARIANTS = ("base", "lm-ft", "r-ft", "ra-dit")
DATASET = "nq_open_oracle"


def radit_spec(tmp, shared):
    enc, lm = tiny_bert(tmp / "encoder"), tiny_lm(tmp / "lm")
    questions = str(oracle_questions(shared, tmp / "questions.jsonl", 40))
    spec = {
        "name": "radit-test", "seed": 0,
        "recipe": {"type": "ra-dit", "lsr": {
            "data": [{"type": "qa-pairs", "path": questions}], "examples": 24, "k": 4,
            "lr": 2e-3, "epochs": 6, "batch_size": 8, "lm_batch_size": 16, "max_tokens": 160}},
        "model": {"type": "hf-causal-lm", "init": str(lm)},
        "corpus": {"type": "jsonl", "doc_id_field": None, "prepend_title": True,
                   "paths": [str(oracle_corpus(shared, tmp / "corpus.jsonl", 40))]},
        "tokenizer": {"type": "gpt2-files", "path": str(shared / "tokenizer_gpt2")},
        "retriever": {"type": "dense", "chunk_length": 32, "split": {"valid": 0.0, "heldout": 0.0},
                      "embedder": {"type": "hf-mean-pool", "model": str(enc), "batch_size": 32},
                      "index": {"type": "faiss", "factory": "Flat"}},
        "instruct": {"type": "ra-it", "blend": [{"type": "qa-pairs", "path": questions}],
                     "steps": 3, "global_batch": 4, "micro_batch": 4, "retrieve_k": 2,
                     "lr": 1e-3, "warmup": 0, "eval_samples": 2, "eval_interval": 3},
        "eval": [{"type": "qa", "datasets": [DATASET], "data_dir": str(shared), "limit": 4,
                  "retrieve_k": 4, "passages": 2, "replug": True, "max_new_tokens": 3,
                  "max_prompt_tokens": 256}],
        "tracking": "none",
        "store": {"path": str(tmp / "store"), "runs": str(tmp / "runs")},
        "resources": {"default": {"checkpoint_interval": 3}},
    }
    path = tmp / "radit-test.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path, enc, lm


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_session):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    tmp = tmp_path_factory.mktemp("radit")
    path, enc, lm = radit_spec(tmp, SHARED_DATA)
    record, outcome, plan = api.run(path)
    assert outcome.ok, outcome.failures
    return {"record": record, "plan": plan, "arts": artifacts_by_name(tmp / "store", plan),
            "encoder": enc, "lm": lm, "tmp": tmp}


def test_plan_shares_the_db_and_wires_four_variants(run):
    calls = {s.name: s for s in run["plan"].stages}
    assert {"lm-folder", "embed", "fill-index", "lsr", "ra-it", "qa-retrieve-base",
            "qa-retrieve-r-ft"} <= set(calls)
    assert {f"eval-qa-{v}" for v in VARIANTS} <= set(calls)
    assert sum(s.stage == "embed" for s in run["plan"].stages) == 1


def test_report_shows_each_variant_with_em_f1_and_recall(run):
    report = build_report(run["record"])
    m = {k: v[report.variants[0]] for k, v in report.metrics.items()}
    for v in VARIANTS:
        for metric in ("em", "f1", "n", "answer_in_prompt"):
            assert f"eval-qa-{v}/{DATASET}/{metric}" in m
        assert m[f"eval-qa-{v}/{DATASET}/n"] == 4
    for r in ("base", "r-ft"):
        for k in (1, 4):
            assert 0 <= m[f"qa-retrieve-{r}/{DATASET}/recall@{k}"] <= 100
    # the answers came from the REPLUG mixture over 2 passages
    rows = [json.loads(x) for x in (run["arts"]["eval-qa-ra-dit"].path / "predictions" /
                                    f"{DATASET}.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["prior"]) == 2 and
                                  sum(r["posterior"]) == pytest.approx(1, abs=1e-3)
                                  for r in rows)


def test_lsr_learns_and_the_fine_tuned_encoder_changes_retrieval(run):
    arts = run["arts"]
    s = arts["lsr"].manifest["summary"]
    assert s["excluded_eval_questions"] == 4          # the 4 test questions are not trained on
    assert s["examples"] == 24 and s["k"] == 4
    assert s["loss_last_10pct"] < s["loss_first_10pct"]
    assert s["train_kl_after"] < s["train_kl_before"]
    curve = [r["loss"] for r in _metrics(arts["lsr"])]
    assert len(curve) == s["steps"]

    def scores(name):
        rows = (arts[name].path / "contexts" / f"{DATASET}.jsonl").read_text().splitlines()
        return [p["score"] for r in rows for p in json.loads(r)["passages"]]

    assert not np.allclose(scores("qa-retrieve-base"), scores("qa-retrieve-r-ft"))


def test_ra_it_trains_on_k_rows_per_example_and_exports_a_loadable_model(run):
    from retro.components.evaluators.lm import load_eval_lm

    art = run["arts"]["ra-it"]
    s = art.manifest["summary"]
    assert s["rows"] == 2 * s["examples"] and s["excluded_eval_questions"] == 4
    tuned = load_eval_lm(art.path).model.decoder.state_dict()
    base = load_eval_lm(run["lm"]).model.decoder.state_dict()
    assert any(not torch.equal(tuned[k], base[k]) for k in base)
    first = json.loads((art.path / "retrieved.jsonl").read_text().splitlines()[0])
    assert len(first["chunk_ids"]) == 2


def test_lsr_leaves_document_encoder_and_index_bit_identical(run, tmp_path):
    from retro.components.radit.query_encoder import QueryEncoder
    from retro.components.radit.stages import lsr
    from retro.components.retrieval.common import build_component

    arts, enc_dir = run["arts"], run["encoder"]
    spec = yaml.safe_load((run["tmp"] / "radit-test.yaml").read_text())
    watched = {"embeddings": arts["embed"].path / "embeddings.npy",
               "index": arts["fill-index"].path / "index.faissindex", "encoder": enc_dir}
    before = {k: sha256_tree(p) for k, p in watched.items()}
    node = spec["retriever"]["embedder"]
    # before training the query encoder is the embedder, pooling included (the query encoder
    # trains in fp32, so the embedder is pinned to fp32 to compare them)
    texts = ["who got the first nobel prize in physics", "deadpool 2 release date"]
    np.testing.assert_allclose(QueryEncoder(node).encode(texts),
                               build_component("embedder", {**node, "precision": "fp32"})
                               .embed(texts), atol=1e-5)
    params = {"lsr": {**spec["recipe"]["lsr"], "epochs": 2}, "retriever_type": "dense",
              "embedder": node, "index": {"type": "faiss", "factory": "Flat"},
              "exclude_questions": []}
    inputs = {"lm": as_artifact(run["lm"]), "embeddings": arts["embed"],
              **{s: arts[c] for s, c in (("tokenizer", "tokenizer"), ("tokens", "tokenize"),
                                         ("chunk_db", "chunk-db"), ("index", "fill-index"))}}
    ctx = stage_ctx(tmp_path, "lsr", params, inputs)
    summary = lsr(ctx)
    assert {k: sha256_tree(p) for k, p in watched.items()} == before
    assert len(metrics_rows(ctx)) == summary["steps"]
    from safetensors.torch import load_file

    trained = load_file(str(ctx.out_dir / "query_encoder" / "model.safetensors"))
    original = load_file(str(enc_dir / "model.safetensors"))
    assert trained.keys() == original.keys()
    assert any(not torch.equal(trained[k], original[k]) for k in original)
    # p_LSR in the examples file is softmax(log p_LM / τ) of its own LM scores
    ex = json.loads((ctx.out_dir / "examples.jsonl").read_text().splitlines()[0])
    valid = [i for i, c in enumerate(ex["chunk_ids"]) if c >= 0]
    z = np.array([ex["lm_logprob"][i] for i in valid]) / 0.01
    np.testing.assert_allclose([ex["p_lsr"][i] for i in valid],
                               np.exp(z - z.max()) / np.exp(z - z.max()).sum(), atol=1e-3)


def _metrics(art):
    f = art.path / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []
