"""Ray Train for real (local Ray, gloo): worker-count invariance, a killed worker, FSDP, and a
killed launcher process resumed by the next attempt. Each `fit()` costs ~20 s of actor start-up
on this machine, so these tests are few and share runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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


_LAUNCH = """
import pickle, sys
from retro.platform.scheduler import connect_ray
from retro.components.training.launcher import launch
connect_ray(num_cpus=1)
job = pickle.load(open(sys.argv[1], "rb"))
launch(job, num_workers=1, storage=sys.argv[2])
"""


def test_killed_launcher_is_resumed_by_the_next_attempt(ray_session, one_worker, rows_file,
                                                        tmp_path):
    """The whole launching process (and its Ray) is killed after a checkpoint; launching the
    same job on the same storage again resumes from that checkpoint, not from step 0."""
    import pickle

    ref, _ = one_worker
    j = _job(tmp_path / "out", rows_file)
    (tmp_path / "job.pkl").write_bytes(pickle.dumps(j))
    env = {**os.environ, "RAY_TMPDIR": f"/tmp/rk{os.getpid() % 10000}"}
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, str(tmp_path / "job.pkl"),
                             str(tmp_path / "work")], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (
                j.metrics_file.exists() and len(_losses(j)) >= EVERY + 2):
            assert proc.poll() is None, "launcher exited before it could be killed"
            time.sleep(0.05)
        assert EVERY + 2 <= len(_losses(j)) < STEPS
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    summary = launch(j, num_workers=1, storage=tmp_path / "work")
    assert summary["resumed_from"] in (EVERY, 2 * EVERY)
    rows = rows_of(j.metrics_file)
    last = max(i for i, r in enumerate(rows) if r["kind"] == "resume")
    assert rows[last]["step"] == summary["resumed_from"]
    assert [r["step"] for r in rows[last + 1:] if r["kind"] == "train"] == \
        list(range(summary["resumed_from"] + 1, STEPS + 1))
    np.testing.assert_allclose(_losses(j)[-1], _losses(ref)[-1], rtol=0, atol=1e-5)
