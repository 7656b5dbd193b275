"""The faiss index component and the train-index / fill-index / quality stages, without Ray."""

from __future__ import annotations

import numpy as np
import pytest

from retro.components.retrieval.common import build_component, write_meta
from retro.components.retrieval.faiss_index import FILLED, fill_index, train_index
from retro.components.retrieval.quality import exact_search, recall_at, retrieval_quality
from retro.platform.errors import UserError
from retro.platform.registry import registry
from tests.retrieval.helpers import stage_ctx


@pytest.fixture
def emb_dir(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    d = tmp_path / "emb"
    d.mkdir()
    np.save(d / "embeddings.npy", x)
    write_meta(d, dim=32, dtype="float32", n=len(x))
    return d


def _build(tmp_path, emb_dir, index_node, num_workers=1, tag=""):
    node = {"type": "faiss", **index_node}
    tctx = stage_ctx(tmp_path, f"train{tag}", {"index": node}, {"embeddings": emb_dir})
    train_index(tctx)
    fctx = stage_ctx(tmp_path, f"fill{tag}", {}, {"index": tctx.out_dir,
                                                  "embeddings": emb_dir}, num_workers)
    import retro.components.retrieval.faiss_index as fi

    fi._ROWS_PER_SHARD, old = 700, fi._ROWS_PER_SHARD  # several shards on 3000 rows
    try:
        fill_index(fctx)
    finally:
        fi._ROWS_PER_SHARD = old
    return build_component("index", node), fctx.out_dir


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "IVF16,PQ8x4", "OPQ4,IVF16,PQ4x4",
                                     "IVF16_HNSW8,SQ8", "HNSW8,Flat"])
def test_sharded_fill_equals_a_serial_add(tmp_path, emb_dir, factory):
    import faiss

    spec, out = _build(tmp_path, emb_dir, {"factory": factory, "nprobe": 4}
                       if "IVF" in factory else {"factory": factory})
    index = spec.read(out / FILLED)
    x = np.load(emb_dir / "embeddings.npy")
    serial = faiss.read_index(str(tmp_path / "train" / "out" / "trained.faissindex"))
    serial.add(x)
    spec.apply_query_params(serial)
    assert index.ntotal == 3000
    d1, i1 = index.search(x[:50], 5)
    d2, i2 = serial.search(x[:50], 5)
    assert (i1 == i2).all()


def test_training_sample_is_seeded_and_sized(tmp_path, emb_dir):
    import json

    _build(tmp_path, emb_dir, {"factory": "IVF8,Flat", "train_fraction": 0.5,
                               "train_size": 1000})
    assert json.loads((tmp_path / "train" / "out" / "meta.json").read_text())["n_train"] == 1000


def test_invalid_factory_strings_fail_before_training(tmp_path, emb_dir):
    model = registry.get("index", "faiss").node_model()
    with pytest.raises(ValueError, match="not a faiss index_factory string"):
        model.model_validate({"factory": "IVF16 Flat;"})
    with pytest.raises(UserError, match=r"factory 'IVF16,PQ7' is invalid for 32-d"):
        _build(tmp_path, emb_dir, {"factory": "IVF16,PQ7"})
    with pytest.raises(UserError, match=r"factory 'Bogus12' is invalid"):
        build_component("index", {"type": "faiss", "factory": "Bogus12"}).check(32)
    with pytest.raises(UserError, match="needs at least k"):
        _build(tmp_path, emb_dir, {"factory": "IVF2048,Flat", "train_size": 100}, tag="2")


def test_dims_mismatch_and_misplaced_query_params(tmp_path, emb_dir):
    with pytest.raises(UserError, match="index.dim is 64 but the embeddings have dim 32"):
        _build(tmp_path, emb_dir, {"factory": "Flat", "dim": 64})
    spec, out = _build(tmp_path, emb_dir, {"factory": "Flat"}, tag="b")
    with pytest.raises(UserError, match="nprobe is set but 'Flat' has no IVF stage"):
        build_component("index", {"type": "faiss", "nprobe": 4}).read(out / FILLED)


def test_exact_search_and_recall_against_flat(emb_dir):
    import faiss

    x = np.load(emb_dir / "embeddings.npy")
    import retro.components.retrieval.quality as q

    q._EXACT_BLOCK, old = 512, q._EXACT_BLOCK  # several blocks merged through the heap
    try:
        d, i = exact_search(x, x[:20], 10, "ip")
    finally:
        q._EXACT_BLOCK = old
    flat = faiss.IndexFlatIP(32)
    flat.add(x)
    d2, i2 = flat.search(x[:20], 10)
    assert (i == i2).all() and np.allclose(d, d2, atol=1e-5)
    assert recall_at(i2, i2, 10) == 1.0
    half = i2.copy()
    half[:, 5:] = -1
    assert recall_at(half, i2, 10) == 0.5


def test_quality_stage_reports_and_enforces_min_recall(tmp_path, emb_dir):
    spec, out = _build(tmp_path, emb_dir, {"factory": "IVF16,PQ4x4", "nprobe": 1})
    node = {"type": "faiss", "factory": "IVF16,PQ4x4", "nprobe": 1}
    ctx = stage_ctx(tmp_path, "q", {"index": node, "quality": {"probe_size": 100}},
                    {"embeddings": emb_dir, "index": out})
    result = retrieval_quality(ctx)
    assert 0 <= result["recall@2"] < 0.9  # PQ4x4 on random 32-d vectors is coarse
    ctx = stage_ctx(tmp_path, "q2", {"index": node, "quality": {"probe_size": 100,
                                                                "min_recall": 0.95}},
                    {"embeddings": emb_dir, "index": out})
    with pytest.raises(UserError, match=r"recall@2 = 0\.\d+ < retriever.quality.min_recall"):
        retrieval_quality(ctx)
