"""The training stages through the platform, on the real InstructRetro recipe at toy size:
gpt-pretrain -> retro-fit + gpt-fit -> instruct (both arms), with the first `retro run` killed
mid retro-fit and the second one resuming it from its last checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from retro.platform import api

FIT_STEPS, EVERY = 40, 10


def _spec(tmp: Path, data: Path) -> Path:
    spec = {
        "name": "train-stages", "seed": 3,
        "recipe": {"type": "instructretro", "gpt_fit": True},
        "corpus": {"type": "jsonl", "max_documents": 12,
                   "paths": [str(data / "wiki_featured_passages" / "passages.part-00.jsonl.gz")]},
        "tokenizer": {"type": "train-bpe", "vocab_size": 512},
        "retriever": {"type": "bm25", "chunk_length": 16, "neighbours": {"candidates": 10, "k": 2},
                      "split": {"valid": 0.2, "heldout": 0.0, "seed": 1}},
        "model": {"type": "retro", "preset": "retro-nano"},
        "pretrain": {"seq_length": 64, "micro_batch": 8, "eval_interval": EVERY,
                     "eval_batches": 2,
                     "gpt": {"steps": 30, "global_batch": 8, "lr": 3e-3, "min_lr": 3e-4,
                             "warmup": 3},
                     "fit": {"steps": FIT_STEPS, "global_batch": 8, "lr": 1e-3, "warmup": 2}},
        "instruct": {"steps": 4, "global_batch": 8, "micro_batch": 8, "lr": 1e-4,
                     "seq_length": 128, "eval_samples": 8, "blend": [
                         {"type": "alpaca", "samples": 20,
                          "path": str(data / "alpaca_5000" / "alpaca_5000.json.gz")},
                         {"type": "oasst", "weight": 1,
                          "path": str(data / "oasst_en100" / "en_100_tree.jsonl")}]},
        "tracking": [{"type": "none"}],
        "store": {"path": str(tmp / "store"), "runs": str(tmp / "runs")},
        "resources": {"default": {"num_workers": 1, "cpus_per_worker": 1,
                                  "checkpoint_interval": EVERY}},
    }
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _retro_fit_checkpointed(store: Path) -> bool:
    """retro-fit logged step EVERY + 2 and Ray registered its step-EVERY checkpoint."""
    for work in (store / "retro-fit" / ".work").glob("*"):
        snap = work / "ray-train" / "checkpoint_manager_snapshot.json"
        metrics = work / "job" / "train_metrics.jsonl"
        if snap.exists() and "checkpoint_" in snap.read_text() and metrics.exists() and any(
                json.loads(line).get("step", 0) >= EVERY + 2
                for line in metrics.read_text().splitlines()):
            return True
    return False


def _artifact(store: Path, stage: str, name: str | None = None) -> Path:
    for d in sorted((store / stage).iterdir()):
        if (d / "manifest.json").exists() and (
                name is None or json.loads((d / "manifest.json").read_text())["name"] == name):
            return d
    raise AssertionError(f"no {stage} artifact {name}")


@pytest.mark.integration
def test_training_stages_end_to_end_resuming_a_killed_run(ray_session, shared_data, tmp_path):
    spec = _spec(tmp_path, shared_data)
    store = tmp_path / "store"
    env = {**os.environ, "RAY_TMPDIR": f"/tmp/rs{os.getpid() % 10000}"}
    retro = Path(sys.executable).parent / "retro"
    first = subprocess.Popen([str(retro), "run", str(spec)], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and not _retro_fit_checkpointed(store):
            assert first.poll() is None, "the first run ended before it could be killed"
            time.sleep(0.05)
        assert _retro_fit_checkpointed(store)
    finally:
        os.killpg(first.pid, signal.SIGKILL)         # the whole run: CLI, its Ray, the workers
        first.wait()
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert not any((store / "retro-fit").glob("[0-9a-f]*/manifest.json"))   # unfinished

    record, outcome, _ = api.run(spec)
    assert outcome.ok, outcome.failures

    # retro-fit resumed from its checkpoint rather than starting over
    fit = _artifact(store, "retro-fit")
    summary = json.loads((fit / "manifest.json").read_text())["summary"]
    assert summary["resumed_from"] >= EVERY and summary["steps"] == FIT_STEPS
    log = next(record.log_dir.glob("retro-fit*.log")).read_text()
    assert f"resumed from the checkpoint at step {summary['resumed_from']}" in log
    last_progress = [ln for ln in log.splitlines() if "retro-fit steps: " in ln][-1]
    assert f"steps: {FIT_STEPS}/{FIT_STEPS} (100%)" in last_progress and "loss" in last_progress
    rows = [json.loads(line) for line in (fit / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == list(range(1, FIT_STEPS + 1))    # the whole history, each step once
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(rows[0])
    assert [r["step"] for r in rows if "val_ppl" in r] == list(range(EVERY, FIT_STEPS + 1, EVERY))

    # gpt-pretrain learned on the wiki sequences
    pre = [json.loads(line) for line in
           (_artifact(store, "gpt-pretrain") / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in pre if "val_loss" in r]
    assert val[-1] < val[0] - 0.1

    # every artifact is a loadable model directory with its tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retro.components.models.retro import RetroForCausalLM

    for stage, name in (("retro-fit", None), ("gpt-fit", None), ("instruct", "instruct-retro"),
                        ("instruct", "instruct-gpt")):
        d = _artifact(store, stage, name)
        model = RetroForCausalLM.from_pretrained(d)
        assert (model.encoder is not None) == (name != "instruct-gpt" and stage != "gpt-fit")
        assert model.gate == 1.0                           # SFT ran at gate 0, saved as it was
        AutoModelForCausalLM.from_pretrained(d / "decoder")
        tok = AutoTokenizer.from_pretrained(d / "decoder")
        assert len(tok) == model.decoder.config.vocab_size
    # eval-ppl scores Retro with the neighbours it trained with: retro-fit records them
    fit_meta = json.loads((_artifact(store, "retro-fit") / "training.json").read_text())
    assert fit_meta["num_neighbours"] == 2                 # retriever.neighbours.k, all saved

    # the realized blend is in the instruct manifest, with each source's content hash
    manifest = json.loads((_artifact(store, "instruct", "instruct-retro") /
                           "manifest.json").read_text())
    blend = manifest["summary"]["blend"]
    assert [(b["type"], b["samples"]) for b in blend] == [("alpaca", 20), ("oasst", 12)]
    lock = yaml.safe_load((record.dir / "resolved.yaml").read_text())["lock"]["data"]
    assert blend[0]["sha256"] == lock["instruct.blend.0.path"]["sha256"]

    # SFT with retrieval on: rows are searched chunk by chunk against the real DB (bm25); a
    # row made of DB chunks retrieves those chunks, and the worker reads them back as tokens
    _check_sft_retrieval(store, yaml.safe_load(spec.read_text())["retriever"], tmp_path)


def _check_sft_retrieval(store: Path, retriever_node: dict, tmp: Path) -> None:
    import numpy as np

    from retro.components.retrieval.api import ChunkDB, Retriever, load_tokenizer
    from retro.components.training.neighbours import DBNeighbours, retrieve_for_rows

    inputs = {"tokenizer": _artifact(store, "tokenizer"), "tokens": _artifact(store, "tokenize"),
              "chunk_db": _artifact(store, "chunk-db"), "bm25": _artifact(store, "bm25-index")}
    retriever = Retriever.from_artifacts(retriever_node, inputs)
    db = ChunkDB(inputs["chunk_db"], inputs["tokens"])
    picks = [3, 40, 77]
    rows = db.chunk_tokens(np.array([picks, picks[::-1]]).T).reshape(3, -1)   # [3, 2m]
    eod = json.loads((inputs["tokenizer"] / "meta.json").read_text())["eod_id"]
    ids = retrieve_for_rows(retriever, load_tokenizer(inputs["tokenizer"]), rows,
                            seq_length=32, chunk_length=16, k=2, eod=eod)
    assert ids.shape == (3, 2, 2)
    np.testing.assert_array_equal(ids[:, :, 0], np.array([picks, picks[::-1]]).T)
    np.save(tmp / "ids.npy", ids)
    toks = DBNeighbours(str(tmp / "ids.npy"), str(inputs["chunk_db"]),
                        str(inputs["tokens"]), k=2).tokens(np.array([2, 0]))
    assert toks.shape == (2, 2, 2, 32)
    np.testing.assert_array_equal(toks[0, 0, 0, :16], rows[2, :16])
