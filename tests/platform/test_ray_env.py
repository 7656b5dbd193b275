"""Ray defaults the platform sets before starting or joining Ray."""

from __future__ import annotations

import os

from retro.platform.scheduler import ray_env

TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def test_training_workers_wait_for_cpus_held_by_other_stages(monkeypatch):
    """Ray Train gives up after 60 s when its workers cannot be placed; a fit planned beside
    evaluations on a small machine waits longer than that (families-tiny on 2 cores failed
    gpt-fit this way), so the default is an hour."""
    monkeypatch.delenv(TIMEOUT, raising=False)
    ray_env()
    assert int(os.environ[TIMEOUT]) >= 3600


def test_a_timeout_set_by_the_user_wins(monkeypatch):
    monkeypatch.setenv(TIMEOUT, "20")
    ray_env()
    assert os.environ[TIMEOUT] == "20"
