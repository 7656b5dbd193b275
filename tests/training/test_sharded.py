"""FSDP2 without any rank holding the whole model (issue 15 points 1 and 4), on 2 real gloo
workers spawned without Ray (the loop Ray Train workers run, in seconds):

- a model built on the meta device, sharded and materialised shard by shard (seeded init per
  module, GPT / HF weights streamed from sharded safetensors, only each rank's rows read)
  equals the dense build bit for bit: Retro (random, and from a sharded GPT checkpoint), a
  GPT-2-family Retro (whose init rescales a child's weight from the parent), an HF Llama
  decoder (`hf-causal-lm`), and a trained Retro folder (`load_trained`);
- DCP checkpoints reshard: a run checkpointed by 2 FSDP workers resumes on 1, and one
  checkpointed by 1 worker resumes on 2 FSDP workers; both continue the uninterrupted run's
  losses within 1e-5 (fp32);
- during checkpointing, the state dict each rank hands DCP holds about half the model (its
  shards), never the whole;
- the streamed export (sharded safetensors + index) loads with `load_trained` and
  `AutoModelForCausalLM.from_pretrained` and equals the trained weights of the last checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest

from retro.components.training.checkpoint import LocalRuntime, read_checkpoint
from retro.components.training.data import ArrayNeighbours
from retro.components.training.loop import train
from tests.training.helpers import VOCAB, job, model_factory, nano, rows_of, spawn_gloo

M, N, K = 16, 64, 2
STEPS, BATCH, EVERY = 4, 4, 2
HANG_S = 300


# ------------------------------------------------------------------------------ harness
def _worker(rank: int, world: int, port: int, task: str, payload: dict) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        globals()[task](rank, world, **payload)
    finally:
        dist.destroy_process_group()


def _spawn(task: str, **payload) -> None:
    """Run `task(rank, world, **payload)` on 2 spawned gloo workers; a hang fails the test."""
    spawn_gloo(_worker, task, payload, hang_s=HANG_S, what=task)


# ------------------------------------------------------------------------------ builders
def _gpt_dir(tmp: Path) -> Path:
    """A nano GPT saved as a sharded transformers checkpoint (several files + index)."""
    import torch

    from retro.components.training.models import build_fresh

    torch.manual_seed(7)
    gpt = build_fresh(nano(), VOCAB, M, retro=False)
    gpt.decoder.save_pretrained(tmp / "gpt", max_shard_size="40KB")
    return tmp / "gpt"


def _llama_dir(tmp: Path) -> Path:
    """A tiny transformers LlamaForCausalLM from its config, saved sharded."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp / "llama", max_shard_size="40KB")
    return tmp / "llama"


def _trained_dir(tmp: Path) -> Path:
    import torch

    from retro.components.training.models import build_fresh

    torch.manual_seed(5)
    build_fresh(nano(retro=True), VOCAB, M, retro=True).save_pretrained(tmp / "trained")
    return tmp / "trained"


def _builders(tmp: Path) -> dict:
    from retro.components.training.models import build_fresh, load_trained

    gpt, llama, trained = _gpt_dir(tmp), _llama_dir(tmp), _trained_dir(tmp)
    gpt2 = {"type": "retro", "preset": "gpt2-tiny", "retro": True, "cca_layers": [2],
            "overrides": {"n_layers": 2, "d_model": 48, "n_heads": 4, "vocab_size": VOCAB,
                          "max_seq_len": 128}}
    return {
        "retro_random": functools.partial(build_fresh, nano(retro=True), VOCAB, M, retro=True),
        "retro_from_sharded_gpt": functools.partial(build_fresh, nano(retro=True), VOCAB, M,
                                                    retro=True, init_dir=str(gpt)),
        "gpt2_family_random": functools.partial(build_fresh, gpt2, VOCAB, M, retro=True),
        "hf_llama_decoder": functools.partial(
            build_fresh, {"type": "hf-causal-lm", "init": str(llama)}, VOCAB, M, retro=False),
        "load_trained": functools.partial(load_trained, str(trained), retrieval=False),
    }


def _compare_meta_and_dense(rank: int, world: int, out: str, tmp: str) -> None:
    """Each builder: the dense build vs meta + fully_shard + materialise, every tensor."""
    import torch

    from retro.components.training.loop import _wrap
    from retro.components.training.sharded import local_rows, materialise, meta_model

    report = {}
    for name, builder in _builders(Path(tmp)).items():
        torch.manual_seed(0)
        dense = builder()
        want = {k: v.detach().clone() for k, v in dense.state_dict().items()}
        buffers = {k: v.clone() for k, v in dense.named_buffers()}
        grads = {k: p.requires_grad for k, p in dense.named_parameters()}
        del dense
        model = meta_model(builder)
        assert model is not None, name
        model = _wrap(model, True, world, torch.device("cpu"))
        materialise(model, 0, torch.device("cpu"))
        diffs, local_numel, total = [], 0, 0
        for k, p in model.named_parameters():
            full = p.full_tensor()
            lo, hi = local_rows(p)
            local_numel += p.to_local().numel()
            total += p.numel()
            if not (torch.equal(full, want[k]) and torch.equal(p.to_local(), want[k][lo:hi])
                    and p.requires_grad == grads[k]):
                diffs.append(k)
        diffs += [k for k, b in model.named_buffers() if not torch.equal(b, buffers[k])]
        report[name] = {"diffs": diffs, "local": local_numel, "total": total}
    if rank == 0:
        Path(out).write_text(json.dumps(report))


def test_meta_init_and_sharded_load_equal_the_dense_build_bit_for_bit(tmp_path):
    from retro.components.training.sharded import meta_model

    out = tmp_path / "report.json"
    _spawn("_compare_meta_and_dense", out=str(out), tmp=str(tmp_path))
    report = json.loads(out.read_text())
    assert set(report) == {"retro_random", "retro_from_sharded_gpt", "gpt2_family_random",
                           "hf_llama_decoder", "load_trained"}
    assert len(list((tmp_path / "gpt").glob("*.safetensors"))) > 1    # really sharded
    assert (tmp_path / "gpt" / "model.safetensors.index.json").is_file()
    for name, r in report.items():
        assert r["diffs"] == [], name
        assert r["local"] < 0.6 * r["total"], name          # each rank: about half
    # a builder that cannot build on the meta device keeps the dense path
    assert meta_model(lambda: None) is None


# ------------------------------------------------------------------------------ resume
class _Stop(Exception):
    pass


class _StopAt:
    """Training rows whose `batch` raises `_Stop` on the n-th call (a run cut after n-1 steps,
    on every rank at the same step, before any collective of that step)."""

    def __init__(self, inner, n):
        self.inner, self.n = inner, n

    def __call__(self):
        rows, n = self.inner(), self.n
        calls = [0]

        class Rows:
            seq_length = rows.seq_length

            def __len__(self):
                return len(rows)

            def batch(self, idx):
                calls[0] += 1
                if calls[0] == n:
                    raise _Stop()
                return rows.batch(idx)

        return Rows()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded")
    rng = np.random.default_rng(0)
    walk = np.cumsum(rng.integers(-2, 3, (24, N)), axis=1) % VOCAB
    np.save(d / "train.npy", walk.astype(np.uint16))
    return d, functools.partial(ArrayNeighbours, rng.integers(0, VOCAB, (24, N // M, K, 2 * M)))


def _job(out: Path, data, stop: bool = False, **run):
    import dataclasses

    d, nb = data
    j = job(out, d / "train.npy", steps=STEPS, global_batch=BATCH, lr=3e-3, micro_batch=2,
            checkpoint_interval=EVERY, precision="fp32", neighbours=nb,
            model=model_factory(nano(retro=True), m=M),   # no dropout: masks are per rank
            fsdp=True, **run)
    return dataclasses.replace(j, train_data=_StopAt(j.train_data, EVERY + 1)) if stop else j


def _train_2(rank: int, world: int, jobs: list, root: str, sizes: str) -> None:
    """The 2-worker parts: each job in turn on one checkpoint root, a `_Stop` ends a job;
    every state dict handed to DCP is measured (this rank's bytes vs the full model's)."""
    import torch.distributed.checkpoint as dcp

    from retro.components.training.dcp import local_bytes

    real_save, seen = dcp.save, []

    def spy(state_dict, *args, **kwargs):
        model_full = sum(v.numel() * v.element_size() for v in state_dict["model"].values())
        seen.append({"model_local": local_bytes(state_dict["model"]),
                     "all_local": local_bytes(state_dict), "model_full": model_full})
        return real_save(state_dict, *args, **kwargs)

    dcp.save = spy
    for j, r in zip(jobs, root.split("|")):
        runtime = LocalRuntime(Path(r))
        runtime.rank, runtime.world_size = rank, world
        try:
            train(j, runtime)
        except _Stop:
            pass
    Path(f"{sizes}.{rank}").write_text(json.dumps(seen))


def _losses(j) -> list[float]:
    by_step = {r["step"]: r["loss"] for r in rows_of(j.metrics_file) if r["kind"] == "train"}
    return [by_step[s] for s in sorted(by_step)]


def test_resharded_resume_2_to_1_and_1_to_2_continue_the_run(data, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from retro.components.training.models import load_trained

    ref = _job(tmp_path / "ref", data)
    train(ref, LocalRuntime(tmp_path / "ref-ckpt"))

    # 1 -> 2: one worker stops after step 3 (checkpoint at 2) ...
    one_first = _job(tmp_path / "1to2", data, stop=True)
    with pytest.raises(_Stop):
        train(one_first, LocalRuntime(tmp_path / "1to2-ckpt"))
    # ... two workers: the 2 -> 1 first half, then the 1 -> 2 second half (a streamed export
    # of small shards)
    two_first = _job(tmp_path / "2to1", data, stop=True)
    two_second = _job(tmp_path / "1to2", data, export_shard_bytes=64 * 1024)
    sizes = tmp_path / "sizes"
    _spawn("_train_2", jobs=[two_first, two_second],
           root=f"{tmp_path / '2to1-ckpt'}|{tmp_path / '1to2-ckpt'}", sizes=str(sizes))
    # ... 2 -> 1: one worker resumes the 2-worker checkpoint
    one_second = _job(tmp_path / "2to1", data)
    summary = train(one_second, LocalRuntime(tmp_path / "2to1-ckpt"))

    assert summary["resumed_from"] == EVERY
    for j in (one_second, two_second):
        resumes = [r["step"] for r in rows_of(j.metrics_file) if r["kind"] == "resume"]
        assert resumes == [EVERY]
        np.testing.assert_allclose(_losses(j), _losses(ref), rtol=0, atol=1e-5)
        assert len(_losses(j)) == STEPS

    # checkpointing: each rank's state dict holds its shards, about half of the model
    for rank in (0, 1):
        seen = json.loads(Path(f"{sizes}.{rank}").read_text())
        assert len(seen) == 2           # step 2 of the 2->1 run, step 4 of the resumed 1->2
        for s in seen:
            assert s["model_local"] < 0.6 * s["model_full"], s
            assert s["all_local"] < s["model_full"] * 3 * 0.6, s   # + AdamW's 2 moments

    # the streamed export: sharded files + index, loadable, equal to the step-4 weights
    final = two_second.final_dir
    assert (final / "decoder" / "model.safetensors.index.json").is_file()
    assert len(list((final / "decoder").glob("model-*-of-*.safetensors"))) > 1
    assert (final / "retro_config.json").is_file()
    trained = read_checkpoint(sorted((tmp_path / "1to2-ckpt").glob("checkpoint_*"))[-1])[0]
    loaded = load_trained(str(final)).state_dict()
    assert set(trained) <= set(loaded)
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    decoder = AutoModelForCausalLM.from_pretrained(final / "decoder").state_dict()
    assert all(torch.equal(decoder[k], trained[f"decoder.{k}"]) for k in decoder
               if f"decoder.{k}" in trained)
