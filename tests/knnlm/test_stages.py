"""The knn-datastore -> train-index -> fill-index -> eval-knnlm chain, inline on hand-built
artifacts with a random tiny GPT-2: causality of the stored keys, the rows' values and
documents, and an evaluation whose lambda = 0 is the plain LM."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from retro.components.knnlm.datastore import Datastore, knn_datastore
from retro.components.knnlm.eval_knn import eval_knnlm
from retro.components.retrieval.faiss_index import fill_index, train_index
from tests.conftest import SHARED_DATA
from tests.evaluation.helpers import as_artifact, stage_ctx
from tests.knnlm.helpers import db_artifacts, tiny_gpt2

L = 16
INDEX = {"type": "faiss", "factory": "Flat", "metric": "l2"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    tmp = tmp_path_factory.mktemp("knnlm")
    rng = np.random.default_rng(0)
    docs = [rng.integers(100, 5000, size=n).tolist() for n in (20, 25, 18, 30, 22)]
    model = as_artifact(tiny_gpt2(tmp / "lm"))
    return {"tmp": tmp, "docs": docs, "model": model,
            "arts": db_artifacts(tmp / "db", docs, [0, 0, 0, 1, 1], L)}


def _datastore(tmp, name, arts, model, key="ffn_input"):
    ctx = stage_ctx(tmp, name, {"key": key, "fp16": False, "precision": "fp32"},
                    {"model": model, "sequences": arts["sequences-train"],
                     "tokens": arts["tokens"], "chunk_db": arts["chunk_db"], "tokenizer": model})
    knn_datastore(ctx)
    return Datastore(ctx.out_dir)


@pytest.mark.parametrize("key", ["ffn_input", "final"])
def test_key_at_t_never_sees_token_t_plus_1(setup, key):
    tmp, arts, model = setup["tmp"], setup["arts"], setup["model"]
    store = _datastore(tmp, f"ds-{key}", arts, model, key)
    seqs = np.load(arts["sequences-train"].path / "tokens.npy")
    n_seq = len(seqs)
    assert len(store) == n_seq * (L - 1) and store.keys.shape[1] == 16
    # value of row (i, t) is token t + 1 of sequence i
    assert np.array_equal(np.asarray(store.values).reshape(n_seq, L - 1), seqs[:, 1:])
    # change token t + 1 = 6 of sequence 1 (and everything after it): keys at t <= 5 unchanged
    t = 5
    changed = tmp / f"db-changed-{key}"
    shutil.copytree(arts["sequences-train"].path, changed)
    toks = np.load(changed / "tokens.npy")
    toks[1, t + 1:] = (toks[1, t + 1:] + 17) % 5000 + 100
    np.save(changed / "tokens.npy", toks)
    other = _datastore(tmp, f"ds2-{key}", {**arts, "sequences-train": as_artifact(changed)},
                       model, key)
    a = np.asarray(store.keys).reshape(n_seq, L - 1, -1)
    b = np.asarray(other.keys).reshape(n_seq, L - 1, -1)
    assert np.array_equal(a[1, :t + 1], b[1, :t + 1])         # keys 0..t: prefix only
    assert not np.allclose(a[1, t + 1], b[1, t + 1])          # key t+1 reads token t+1
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[2:], b[2:])


def test_rows_carry_the_document_of_their_target(setup):
    tmp, arts, docs = setup["tmp"], setup["arts"], setup["docs"]
    store = _datastore(tmp, "ds-docs", arts, setup["model"])
    # train stream: doc0 (20) + EOD, doc1 (25) + EOD, doc2 (18) + EOD; row (i, t) -> position
    # i*L + t + 1 of the stream
    bounds = np.cumsum([len(docs[0]) + 1, len(docs[1]) + 1, len(docs[2]) + 1])
    n_seq = len(store) // (L - 1)
    pos = (np.arange(n_seq)[:, None] * L + np.arange(1, L)).reshape(-1)
    expect = np.searchsorted(bounds, pos, side="right")
    assert np.array_equal(np.asarray(store.docs), expect)
    assert set(np.asarray(store.docs)) <= {0, 1, 2}            # never a valid document


def test_eval_lambda_0_is_the_lm_and_retrieval_changes_the_score(setup):
    tmp, arts, model = setup["tmp"], setup["arts"], setup["model"]
    _datastore(tmp, "ds-eval", arts, model)
    ds = as_artifact(tmp / "ds-eval" / "out", "knn-datastore")
    tctx = stage_ctx(tmp, "ti", {"index": INDEX}, {"embeddings": ds})
    train_index(tctx)
    fctx = stage_ctx(tmp, "fi", {}, {"index": as_artifact(tctx.out_dir),
                                     "embeddings": ds})
    fill_index(fctx)
    scores = {}
    for lmbda in (0.0, 0.5):
        node = {"type": "knn-lm", "k": 8, "lmbda": lmbda, "precision": "fp32",
                "batch_size": 2, "index": INDEX}
        if lmbda:   # as a recipe's Pick passes it: narrowed, `index` left at its default
            node = {**{k: v for k, v in node.items() if k != "index"}, "__picked__": True}
        ctx = stage_ctx(tmp, f"ev-{lmbda}", {"evaluator": node, "index": INDEX},
                        {"model": model, "sequences": arts["sequences-valid"],
                         "tokenizer": model, "datastore": ds,
                         "index": as_artifact(fctx.out_dir)})
        scores[lmbda] = eval_knnlm(ctx)
        rows = [json.loads(x) for x in (ctx.out_dir / "per_sequence.jsonl").read_text()
                .splitlines()]
        assert rows and all(r["tokens"] == L - 1 for r in rows)
        if lmbda == 0.0:
            assert all(r["nll"] == pytest.approx(r["lm_nll"], abs=1e-9) for r in rows)
        results = json.loads((ctx.out_dir / "results.json").read_text())
        assert results["family"].startswith("ppl/") and results["condition"] == {
            "retrieval": "knn-lm"}
    assert scores[0.5]["ppl"] != pytest.approx(scores[0.5]["lm_ppl"], rel=1e-6)
    assert scores[0.0]["lm_ppl"] == pytest.approx(scores[0.5]["lm_ppl"], rel=1e-9)


def test_datastore_shards_compute_on_the_stage_gpu_when_given_one(setup, monkeypatch):
    """`gpus_per_worker > 0` on a CUDA host: the shards load the LM on "cuda" (simulated: CUDA
    reported present, the model still loaded on CPU), the keys are the CPU run's."""
    import dataclasses

    import torch

    import retro.components.knnlm.datastore as ds
    from retro.platform.spec.model import ResourceRequest

    base = _datastore(setup["tmp"], "ds-cpu", setup["arts"], setup["model"])
    seen = []
    real_load = ds.load_eval_lm
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ds, "load_eval_lm", lambda *a, device="cpu", **k:
                        seen.append(device) or real_load(*a, **k))
    monkeypatch.setattr(ds, "stage_precision", lambda ctx, req, device="cpu":
                        seen.append(("precision", device)) or "fp32")
    arts, model = setup["arts"], setup["model"]
    ctx = stage_ctx(setup["tmp"], "ds-gpu", {"key": "ffn_input", "fp16": False,
                                            "precision": "fp32"},
                    {"model": model, "sequences": arts["sequences-train"],
                     "tokens": arts["tokens"], "chunk_db": arts["chunk_db"], "tokenizer": model})
    ds.knn_datastore(dataclasses.replace(ctx, resources=ResourceRequest(gpus_per_worker=1)))
    assert seen[0] == ("precision", "cuda") and set(seen[2:]) == {"cuda"}  # [1]: the probe
    got = Datastore(ctx.out_dir)
    assert np.array_equal(np.asarray(got.keys), np.asarray(base.keys))
