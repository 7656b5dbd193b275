"""Ray Train for real (local Ray, gloo): worker-count invariance, a killed worker, FSDP. Each
`fit()` costs ~20 s of actor start-up on this machine, so these tests are few. (A killed
`retro run` resumed by the next one is tested in test_stages.py.)"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from retro.components.training.launcher import launch
from tests.training.helpers import VOCAB, job, rows_of

STEPS, BATCH, EVERY = 30, 8, 10      # steps, global batch, checkpoint interval


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("rows")
    rng = np.random.default_rng(0)
    # a learnable stream: random walks over the vocabulary, so the loss moves
    walk = np.cumsum(rng.integers(-2, 3, (96, 64)), axis=1) % VOCAB
    np.save(d / "train.npy", walk[:80].astype(np.uint16))
    np.save(d / "valid.npy", walk[80:].astype(np.uint16))
    return d / "train.npy", d / "valid.npy"


def _job(out, rows_file, **run):
    return job(out, *rows_file, steps=STEPS, global_batch=BATCH, lr=3e-3,
               checkpoint_interval=EVERY, micro_batch=2, **run)


def _losses(j):
    """Training loss per step (a step redone after a restart appears once, last value)."""
    by_step = {r["step"]: r["loss"] for r in rows_of(j.metrics_file) if r["kind"] == "train"}
    return [by_step[s] for s in sorted(by_step)]


@pytest.fixture(scope="module")
def one_worker(rows_file, tmp_path_factory):
    """The reference: one worker, in-process (the same loop Ray Train workers run)."""
    d = tmp_path_factory.mktemp("one")
    j = _job(d / "out", rows_file)
    summary = launch(j, num_workers=1, storage=d / "work", use_ray=False)
    return j, summary


def _kill_a_worker_after_checkpoint(metrics: Path, storage: Path, stop: threading.Event,
                                    killed: list) -> None:
    """SIGKILL one of this test's Ray Train worker processes (V2 runs the training function in a
    thread of the `RayTrainWorker` actor) once step EVERY + 2 is logged and Ray's checkpoint
    manager has registered a checkpoint (steps remain). Only descendants of this process are
    candidates: other Ray clusters on the machine are not ours to touch."""
    import psutil

    me = psutil.Process()
    snapshot = storage / "ray-train" / "checkpoint_manager_snapshot.json"
    while not stop.is_set():
        if metrics.exists() and snapshot.exists() and "checkpoint_" in snapshot.read_text() \
                and any(json.loads(line).get("step", 0) >= EVERY + 2
                        for line in metrics.read_text().splitlines()):
            for p in me.children(recursive=True):
                try:
                    running = " ".join(p.cmdline()).startswith("ray::RayTrainWorker")
                except psutil.Error:
                    continue
                if running:
                    os.kill(p.pid, signal.SIGKILL)
                    killed.append(p.pid)
                    return
        time.sleep(0.02)


def test_two_ddp_workers_match_one_even_when_a_worker_is_killed(ray_session, one_worker,
                                                                rows_file, tmp_path):
    """Same global batch on 2 gloo workers (accumulating 2 micro-batches each) gives the
    1-worker losses; a worker SIGKILLed mid-run makes Ray Train restart both ranks from the
    last checkpoint (FailureConfig), and the run still ends on the same numbers."""
    ref, ref_summary = one_worker
    j = _job(tmp_path / "out", rows_file, max_failures=2)
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_worker_after_checkpoint,
                              args=(j.metrics_file, tmp_path / "work", stop, killed))
    killer.start()
    rows: list[dict] = []
    try:
        summary = launch(j, num_workers=2, storage=tmp_path / "work", on_row=rows.append)
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was killed: the test did not exercise a failure"
    resumes = [r["step"] for r in rows_of(j.metrics_file) if r["kind"] == "resume"]
    assert resumes and resumes[0] in (EVERY, 2 * EVERY)
    assert summary["steps"] == STEPS and summary["resumed_from"] == resumes[0]
    np.testing.assert_allclose(_losses(j), _losses(ref), rtol=0, atol=1e-5)
    assert summary["val_loss"] == pytest.approx(ref_summary["val_loss"], abs=1e-5)
    # the stage-side stream saw each step once, in order, despite the replayed steps
    train_steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert train_steps == list(range(1, STEPS + 1))


def test_fsdp_two_workers_match_one_worker(ray_session, one_worker, rows_file, tmp_path):
    ref, ref_summary = one_worker
    j = _job(tmp_path / "out", rows_file, fsdp=True)
    summary = launch(j, num_workers=2, storage=tmp_path / "work")
    np.testing.assert_allclose(_losses(j), _losses(ref), rtol=0, atol=1e-5)
    assert summary["val_loss"] == pytest.approx(ref_summary["val_loss"], abs=1e-5)
    assert (j.final_dir / "retro_config.json").is_file()
