"""The `joint` recipe end to end on a local Ray with tiny real models.

Setup (as tests/radit): 40 real Wikipedia passages (nq_open_oracle gold passages, 32-token
chunks), a random tiny BERT as both towers (the DB is embedded with it), a random tiny Llama as
the reader, oracle questions as training pairs, the first 4 as the QA test set. Arms: fixed,
query-side, staleness (threshold 1.0: every check below it refreshes), every 2 steps, and RA-DIT's
sequential arm.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import yaml

from retro.platform import api
from retro.platform.report import build_report
from tests.conftest import SHARED_DATA
from tests.evaluation.helpers import artifacts_by_name, stage_ctx
from tests.radit.helpers import oracle_corpus, oracle_questions, tiny_bert, tiny_lm

DATASET = "nq_open_oracle"
ARMS = ("fixed", "query-side", "every", "staleness")


def joint_spec(tmp, shared):
    enc, lm = tiny_bert(tmp / "encoder"), tiny_lm(tmp / "lm")
    questions = str(oracle_questions(shared, tmp / "questions.jsonl", 40))
    data = [{"type": "qa-pairs", "path": questions}]
    spec = {
        "name": "joint-test", "seed": 0,
        "recipe": {"type": "joint", "arms": list(ARMS), "every": 2,
                   "joint": {"data": data, "examples": 12, "steps": 4, "batch_size": 3, "k": 3,
                             "lr": 1e-3, "retriever_lr": 1e-2, "max_tokens": 160,
                             "refresh": {"policy": "staleness", "threshold": 1.0,
                                         "probe_queries": 8, "probe_docs": 40, "probe_k": 4,
                                         "shards": 2}},
                   "sequential": {"data": data, "examples": 12, "k": 3, "epochs": 1,
                                  "batch_size": 6, "max_tokens": 160, "lr": 1e-3}},
        "model": {"type": "hf-causal-lm", "init": str(lm)},
        "corpus": {"type": "jsonl", "doc_id_field": None, "prepend_title": True,
                   "paths": [str(oracle_corpus(shared, tmp / "corpus.jsonl", 40))]},
        "tokenizer": {"type": "gpt2-files", "path": str(shared / "tokenizer_gpt2")},
        "retriever": {"type": "dense", "chunk_length": 32, "split": {"valid": 0.0, "heldout": 0.0},
                      "embedder": {"type": "hf-mean-pool", "model": str(enc), "batch_size": 32,
                                   "precision": "fp32"},
                      "index": {"type": "faiss", "factory": "Flat"}},
        "instruct": {"type": "ra-it", "blend": data, "steps": 4, "global_batch": 9,
                     "micro_batch": 9, "retrieve_k": 3, "lr": 1e-3, "warmup": 0,
                     "eval_samples": 0},
        "eval": [{"type": "qa", "datasets": [DATASET], "data_dir": str(shared), "limit": 4,
                  "retrieve_k": 3, "passages": 2, "replug": True, "max_new_tokens": 3,
                  "max_prompt_tokens": 256}],
        "tracking": "none",
        "store": {"path": str(tmp / "store"), "runs": str(tmp / "runs")},
        "resources": {"max_concurrent_stages": 2, "default": {"checkpoint_interval": 2}},
    }
    path = tmp / "joint-test.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path, enc


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_session):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    tmp = tmp_path_factory.mktemp("joint")
    path, enc = joint_spec(tmp, SHARED_DATA)
    record, outcome, plan = api.run(path, ["recipe.sequential=null"])   # its wiring: below
    assert outcome.ok, outcome.failures
    return {"record": record, "plan": plan, "arts": artifacts_by_name(tmp / "store", plan),
            "encoder": enc, "tmp": tmp}


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(art, name):
    return [json.loads(x) for x in (art.path / name).read_text().splitlines() if x.strip()]


def test_query_side_only_leaves_document_embeddings_and_index_byte_identical(run):
    import faiss
    from safetensors.numpy import load_file

    arts = run["arts"]
    qs = arts["joint-query-side"]
    s = qs.manifest["summary"]
    # the document side never changed: same content address, nothing refreshed
    assert s["final_index_digest"] == s["initial_index_digest"] and s["refreshes"] == 0
    # its embeddings are, byte for byte, the DB's `embed` output (same encoder, same settings)
    db = np.load(arts["embed"].path / "embeddings.npy")
    final = np.load(qs.path / "index" / "embeddings.npy")
    assert final.dtype == db.dtype and final.tobytes() == db.tobytes()
    # the index file holds exactly those vectors
    index = faiss.read_index(str(qs.path / "index" / "index.faiss"))
    assert index.reconstruct_n(0, index.ntotal).tobytes() == db.astype(np.float32).tobytes()
    # the document tower's weights are the encoder's, while the query tower moved
    orig = load_file(str(run["encoder"] / "model.safetensors"))
    doc = load_file(str(qs.path / "doc_encoder" / "model.safetensors"))
    query = load_file(str(qs.path / "query_encoder" / "model.safetensors"))
    assert all(np.array_equal(doc[k], orig[k]) for k in orig)
    assert any(not np.array_equal(query[k], orig[k]) for k in orig)
    # contrast: with both towers training, the final index is a different one
    st = arts["joint-staleness"]
    assert st.manifest["summary"]["final_index_digest"] != s["initial_index_digest"]
    assert _sha(st.path / "index" / "embeddings.npy") != _sha(qs.path / "index" / "embeddings.npy")


def test_staleness_is_logged_every_check_and_drives_refreshes(run):
    st = run["arts"]["joint-staleness"]
    s = st.manifest["summary"]
    stale = _rows(st, "staleness.jsonl")
    assert [r["step"] for r in stale] == [1, 2, 3, 4] and s["staleness_checks"] == 4
    assert all(0.0 <= r["recall"] <= 1.0 for r in stale)
    # threshold 1.0: the first check below 1 submits a refresh, at that very step
    below = [r["step"] for r in stale if r["recall"] < 1.0]
    sub = _rows(st, "submitted.jsonl")
    assert below and sub and sub[0]["step"] == below[0]
    assert sub[0]["staleness"] == pytest.approx(stale[below[0] - 1]["recall"])
    # every submitted refresh finished: swapped in between steps, or awaited after the last
    refs = _rows(st, "refreshes.jsonl")
    assert s["refreshes"] == len(refs) == len(sub) == s["refreshes_submitted"]
    steps = _rows(st, "steps.jsonl")
    for r in refs:
        assert r["seconds"] > 0
        if r["swapped_before_step"] is not None:     # that step searched the new index
            assert r["swapped_before_step"] > r["snapshot_step"]
            assert steps[r["swapped_before_step"] - 1]["index_digest"] == r["digest"]
    assert (st.path / "joint.png").stat().st_size > 0


def test_fixed_interval_and_fixed_retriever_arms(run):
    arts = run["arts"]
    every = arts["joint-every"].manifest["summary"]
    assert every["policy"] == "every" and every["refreshes"] >= 1
    # every 2 steps: submitted after step 2, and after step 4 unless step 2's was still in flight
    assert [r["step"] for r in _rows(arts["joint-every"], "submitted.jsonl")] in ([2], [2, 4])
    fixed = arts["joint-fixed"].manifest["summary"]
    assert fixed["retriever_loss"] == "none" and fixed["refreshes"] == 0
    assert fixed["final_index_digest"] == fixed["initial_index_digest"]


def test_report_compares_every_arm_on_the_same_questions(run):
    report = build_report(run["record"])
    m = {k: v[report.variants[0]] for k, v in report.metrics.items()}
    for arm in (*ARMS, "base"):
        assert m[f"eval-qa-{arm}/{DATASET}/n"] == 4
    for arm in ARMS:
        assert 0 <= m[f"joint-retrieve-{arm}/{DATASET}/recall@3"] <= 100
    # the report shows each arm's own plot (loss, staleness, refreshes)
    from retro.platform.report import write_report

    written = write_report(report, run["tmp"] / "report")
    names = {p.name for p in written.plots}
    assert "joint-staleness-joint.png" in names and "joint-every-joint.png" in names
    assert "joint-staleness-joint.png" in written.markdown.read_text()


def test_sequential_arm_is_radit_lsr_then_ra_it_with_its_encoder_on_the_shared_db(run):
    _, plan = api.plan(run["tmp"] / "joint-test.yaml")
    calls = {s.name: s for s in plan.stages}
    ids = {s.id: s.name for s in plan.stages}
    assert {"lsr", "ra-it", "qa-retrieve-r-ft", "eval-qa-sequential"} <= set(calls)
    assert ids[calls["ra-it"].inputs["query_encoder"]] == "lsr"
    assert ids[calls["qa-retrieve-r-ft"].inputs["query_encoder"]] == "lsr"
    assert ids[calls["eval-qa-sequential"].inputs["model"]] == "ra-it"
    assert sum(s.stage == "embed" for s in plan.stages) == 1     # one DB for every arm
    # the same rows for every trained LM: ra-it's steps x global_batch = joint's
    j = calls["joint-staleness"].params["joint"]
    rait = calls["ra-it"].params["instruct"]
    assert rait["steps"] * rait["global_batch"] == j["steps"] * j["batch_size"] * j["k"]


def test_a_resumed_stage_searches_the_index_its_checkpoint_recorded(run, monkeypatch):
    """Kill joint-train after its step-2 checkpoint, run it again: it resumes at step 2 with the
    index digest the checkpoint holds (not a rebuilt initial index)."""
    import torch

    from retro.components.joint import train as jt

    arts, tmp = run["arts"], run["tmp"]
    plan = {s.name: s for s in run["plan"].stages}
    params = dict(plan["joint-staleness"].params)
    inputs = {slot: arts[ref.split("@")[0]] for slot, ref in plan["joint-staleness"].inputs.items()}
    ctx = stage_ctx(tmp, "resume", params, inputs)
    ctx.resources = ctx.resources.model_copy(update={"checkpoint_interval": 2})
    real_step = jt.JointTrainer._step

    def dying(self, step, batch):
        if step == 2:
            raise KeyboardInterrupt("killed")
        return real_step(self, step, batch)

    monkeypatch.setattr(jt.JointTrainer, "_step", dying)
    with pytest.raises(KeyboardInterrupt):
        jt.joint_train(ctx)
    ckpt = torch.load(ctx.work_dir / jt.CHECKPOINT, weights_only=False)
    assert ckpt["step"] == 2
    monkeypatch.setattr(jt.JointTrainer, "_step", real_step)
    ctx.params = params
    for f in ctx.out_dir.iterdir():           # the killed attempt's partial outputs
        if f.is_file():
            f.unlink()
    summary = jt.joint_train(ctx)
    steps = [json.loads(x) for x in (ctx.out_dir / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 4 and summary["steps"] == 4
    assert steps[:2] == ckpt["history"]["steps"]          # steps 1-2 were not redone
    assert summary["initial_index_digest"] == ckpt["initial"]["digest"]
    allowed = {ckpt["index_digest"]}                      # the index it last used ...
    if ckpt["pending"] is not None:                       # ... or the refresh then in flight
        allowed.add(ckpt["pending"]["digest"])
    assert steps[2]["index_digest"] in allowed
