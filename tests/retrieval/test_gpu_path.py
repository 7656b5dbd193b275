"""The GPU path without a GPU: device choice and faiss' GPU-or-CPU choice with a simulated
faiss-gpu (`get_num_gpus` and the CPU<->GPU copies monkeypatched to clones that record calls)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from retro.components.devices import faiss_gpus, stage_device
from retro.components.retrieval.common import write_meta
from retro.components.retrieval.faiss_index import FILLED, TRAINED, fill_index, train_index
from retro.platform.spec.model import ResourceRequest
from tests.retrieval.helpers import stage_ctx


@pytest.fixture
def emb_dir(tmp_path):
    x = np.random.default_rng(0).standard_normal((1200, 16)).astype(np.float32)
    d = tmp_path / "emb"
    d.mkdir()
    np.save(d / "embeddings.npy", x)
    write_meta(d, dim=16, dtype="float32", n=len(x))
    return d


@pytest.fixture
def fake_gpu(monkeypatch):
    """faiss reporting one GPU; 'GPU' indexes are CPU clones, so the code path runs here."""
    calls = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)

    def to(index):
        calls.append("to_gpu")
        return faiss.clone_index(index)

    def back(index):
        calls.append("to_cpu")
        return faiss.clone_index(index)

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", back, raising=False)
    return calls


def _ctx(tmp_path, name, params, inputs, gpus):
    ctx = stage_ctx(tmp_path, name, params, inputs)
    ctx.resources = ResourceRequest(num_workers=1, gpus_per_worker=gpus)
    return ctx


def _build(tmp_path, emb_dir, factory, gpus, tag):
    node = {"type": "faiss", "factory": factory}
    t = _ctx(tmp_path, f"train{tag}", {"index": node}, {"embeddings": emb_dir}, gpus)
    train_index(t)
    f = _ctx(tmp_path, f"fill{tag}", {}, {"index": t.out_dir, "embeddings": emb_dir}, gpus)
    fill_index(f)
    return (t.out_dir / TRAINED).read_bytes(), (f.out_dir / FILLED).read_bytes()


def test_stage_device_needs_both_stage_gpus_and_cuda(tmp_path, monkeypatch):
    import torch

    cpu_stage = _ctx(tmp_path, "a", {}, {}, 0)
    gpu_stage = _ctx(tmp_path, "b", {}, {}, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert stage_device(cpu_stage) == "cpu"        # CUDA present but the spec gave no GPU
    assert stage_device(gpu_stage) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert stage_device(gpu_stage) == "cpu"        # a CPU-only host runs a GPU spec on CPU


def test_cpu_only_faiss_uses_the_plain_index(tmp_path, emb_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)      # faiss-cpu
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda i: calls.append(1) or i)
    assert faiss_gpus(_ctx(tmp_path, "g", {}, {}, 1)) == 0
    _build(tmp_path, emb_dir, "IVF8,Flat", gpus=1, tag="c")
    assert calls == []


def test_gpu_faiss_is_used_only_when_the_stage_has_gpus(tmp_path, emb_dir, fake_gpu):
    _build(tmp_path, emb_dir, "IVF8,Flat", gpus=0, tag="n")
    assert fake_gpu == []                        # a CPU stage never takes a trainer's GPU
    assert faiss_gpus(_ctx(tmp_path, "g", {}, {}, 1)) == 1


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "IVF8,PQ4x4"])
def test_gpu_build_round_trips_to_the_same_cpu_artifact(tmp_path, emb_dir, fake_gpu, factory):
    gpu_train, gpu_fill = _build(tmp_path, emb_dir, factory, gpus=1, tag="g")
    trains = 0 if factory == "Flat" else 1       # Flat needs no training
    assert fake_gpu == ["to_gpu", "to_cpu"] * (trains + 1)   # train + fill, each copied back
    fake_gpu.clear()
    cpu_train, cpu_fill = _build(tmp_path, emb_dir, factory, gpus=0, tag="p")
    assert (gpu_train, gpu_fill) == (cpu_train, cpu_fill)   # same bytes: same CPU format
    index = faiss.read_index(str(tmp_path / "fillg" / "out" / FILLED))
    assert index.ntotal == 1200 and not type(index).__name__.startswith("Gpu")
