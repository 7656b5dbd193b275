"""Running specs on a real local Ray: cache, sweep dedup, failure isolation, resume, concurrency."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from retro.platform import api
from retro.platform.store import ArtifactStore
from tests.platform.helpers import cli, cli_popen, done_keys, events, toy_spec


def test_second_run_executes_nothing(tmp_path, ray_session):
    spec = toy_spec(tmp_path)
    record, outcome, plan = api.run(spec)
    assert outcome.ok and len(done_keys(tmp_path / "runs")) == 3
    total = ArtifactStore(tmp_path / "store").get("toy-total", plan.stages[-1].key)
    assert total.file("total.txt").read_text() == str(2 * sum(range(10)))
    _, outcome2, _ = api.run(spec)
    assert outcome2.ok and set(outcome2.states.values()) == {"cached"}
    assert len(done_keys(tmp_path / "runs")) == 3  # nothing new computed


def test_sweep_shares_every_stage_but_the_last(tmp_path, ray_session):
    spec = toy_spec(tmp_path, sweep={"grid": {"recipe.offset": [0, 7]}})
    record, outcome, plan = api.run(spec)
    assert outcome.ok
    computed = Counter(e["stage"] for e in events(tmp_path / "runs") if e["event"] == "done")
    assert computed == {"source": 1, "scale": 1, "total": 2}
    totals = sorted(int((ArtifactStore(tmp_path / "store").path("toy-total", s.key)
                         / "total.txt").read_text()) for s in plan.stages if s.name == "total")
    assert totals == [90, 97]
    assert (record.dir / "variants" / "offset=7" / "resolved.yaml").exists()


def test_resources_never_change_keys(tmp_path):
    a = api.validate(toy_spec(tmp_path, "a"))[1]
    b = api.validate(toy_spec(tmp_path, "b", resources={
        "num_cpus": 1, "default": {"num_workers": 2, "cpus_per_worker": 0.5}}))[1]
    assert [s.key for s in a.stages] == [s.key for s in b.stages]


def test_failed_stage_stops_only_its_dependents(tmp_path, ray_session):
    spec = toy_spec(tmp_path, sweep={"variants": [
        {"name": "bad", "set": {"recipe.fail": "scale"}}, {"name": "good", "set": {}}]})
    record, outcome, _ = api.run(spec)
    assert not outcome.ok
    by_variant = {}
    for e in record.events():
        if "variants" in e:
            for v in e["variants"]:
                by_variant.setdefault(v, {})[e["stage"]] = e["event"]
    assert by_variant["good"] == {"source": "done", "scale": "done", "total": "done"}
    assert by_variant["bad"] == {"source": "done", "scale": "failed", "total": "blocked"}
    failure = outcome.failures[0]
    assert failure.stage == "scale" and "failed on purpose" in failure.cause
    assert "failed on purpose" in open(failure.log_file).read()
    assert json.loads((record.dir / "status.json").read_text())["status"] == "failed"


def test_cli_run_reports_failure_with_log(tmp_path):
    spec = toy_spec(tmp_path, recipe={"type": "toy", "fail": "total"})
    res = cli("run", spec, cwd=tmp_path)
    assert res.returncode == 1
    assert "stage 'total'" in res.stderr and "failed on purpose" in res.stderr
    assert "log:" in res.stderr and "Traceback" not in res.stderr


def test_sigkill_mid_run_then_rerun_resumes(tmp_path):
    spec = toy_spec(tmp_path, recipe={"type": "toy", "n": 10, "sleep": 3})
    proc = cli_popen("run", spec, cwd=tmp_path)
    store = ArtifactStore(tmp_path / "store")
    deadline = time.time() + 90
    while time.time() < deadline and not any(a.stage == "toy-source"
                                              for a in store.all_artifacts()):
        time.sleep(0.2)
    time.sleep(1.0)  # now inside the scale stage's sleep
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    finished = {a.stage for a in store.all_artifacts()}
    assert "toy-source" in finished and "toy-total" not in finished
    for a in store.all_artifacts():  # whatever exists is complete
        assert a.manifest["key"] == a.key
    res = cli("run", spec, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    runs = sorted((tmp_path / "runs").iterdir())
    second = [json.loads(x) for x in (runs[-1] / "events.jsonl").read_text().splitlines()]
    states = {e["stage"]: e["event"] for e in second if "stage" in e and e["event"] != "started"}
    assert states["source"] == "cached" and states["total"] == "done"
    assert Counter(done_keys(tmp_path / "runs")).most_common(1)[0][1] == 1


def test_two_processes_compute_each_shared_key_once(tmp_path):
    a = toy_spec(tmp_path, "a", recipe={"type": "toy", "n": 10, "sleep": 1})
    b = toy_spec(tmp_path, "b", recipe={"type": "toy", "n": 10, "sleep": 1, "offset": 3})
    procs = [cli_popen("run", a, cwd=tmp_path), cli_popen("run", b, cwd=tmp_path)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    computed = Counter(done_keys(tmp_path / "runs"))
    assert all(n == 1 for n in computed.values()), computed
    assert len(computed) == 4  # source + scale shared, two totals


@pytest.mark.parametrize("workers", [1, 2])
def test_parallel_map_gives_same_result_with_any_worker_count(tmp_path, ray_session, workers):
    spec = toy_spec(tmp_path, resources={"stages": {"scale": {"num_workers": workers}}})
    _, outcome, plan = api.run(spec)
    assert outcome.ok
    total = ArtifactStore(tmp_path / "store").path("toy-total", plan.stages[-1].key)
    assert (total / "total.txt").read_text() == "90"


def test_rerun_recomputes_only_the_named_stage(tmp_path, ray_session):
    spec = toy_spec(tmp_path)
    api.run(spec)
    _, outcome, plan = api.run(spec, rerun=["scale"])
    states = {plan.by_id(i).name: s for i, s in outcome.states.items()}
    assert states == {"source": "cached", "scale": "done", "total": "cached"}
    store = ArtifactStore(tmp_path / "store")
    assert store.exists("toy-scale", plan.stages[1].key)
    from retro.platform.errors import UserError

    with pytest.raises(UserError, match="did you mean 'scale'"):
        api.run(spec, rerun=["scael"])


def test_fields_a_call_does_not_pick_neither_reach_the_stage_nor_its_key(tmp_path):
    """Positive lists: a `Pick` of some recipe fields is all the stage sees and its key holds."""
    from retro.platform.plan import build_plan
    from retro.platform.spec import load_spec
    from retro.platform.spec.node import PICKED
    from retro.platform.stage import Pick

    import retro_toy

    original = retro_toy.ToyRecipe.stages

    def stages(self, spec):
        calls = original(self, spec)
        calls[0].reads = {"n": "recipe.n", "label": Pick("recipe", ("label",))}
        return calls

    class Params(retro_toy.SourceParams):
        label: dict

    retro_toy.ToyRecipe.stages = stages
    saved = retro_toy.toy_source.params
    retro_toy.toy_source.params = Params
    try:
        plans = [build_plan(load_spec(toy_spec(tmp_path, f"s{o}",
                                               recipe={"type": "toy", "offset": o})))
                 for o in (0, 5)]
    finally:
        retro_toy.ToyRecipe.stages = original
        retro_toy.toy_source.params = saved
    sources = [p.stages[0] for p in plans]
    assert sources[0].params["label"] == {"type": "toy", "label": "", PICKED: True}  # no offset
    assert sources[0].key == sources[1].key
    assert plans[0].stages[-1].key != plans[1].stages[-1].key



def test_secret_env_values_stay_out_of_run_files_and_store(tmp_path):
    secret = "tk-0a1b2c3d4e5f60718293a4b5c6d7e8f9"
    env = {"TOY_API_TOKEN": secret}
    spec = toy_spec(tmp_path, recipe={"type": "toy", "label": "${env:TOY_API_TOKEN}"})
    res = cli("run", spec, "-o", "description=key ${env:TOY_API_TOKEN}", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != spec]
    assert any(p.name == "manifest.json" for p in written)
    leaked = [str(p) for p in written if secret.encode() in p.read_bytes()]
    assert leaked == [] and secret not in res.stdout + res.stderr
    run_dir = next((tmp_path / "runs").iterdir())
    resolved = (run_dir / "resolved.yaml").read_text()
    assert "label: ${env:TOY_API_TOKEN}" in resolved
    # the kept file is still runnable: the placeholder reads the same secret, same keys
    again = cli("run", run_dir / "resolved.yaml", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    assert len(done_keys(tmp_path / "runs")) == 3


def _square_item_0_last(job):
    """Item 0 waits until the last item has run, so it finishes after all the others."""
    x, marker, last = job
    deadline = time.time() + 120                       # fail, never hang, if run serially
    while x == 0 and not os.path.exists(marker) and time.time() < deadline:
        time.sleep(0.05)
    if x == last:
        open(marker, "w").close()
    return x * x


def test_ray_parallel_map_reports_each_item_as_it_finishes_and_keeps_order(tmp_path,
                                                                           ray_session):
    from retro.platform.execute import _ray_parallel_map
    from retro.platform.spec.model import ResourceRequest

    seen = []
    jobs = [(x, str(tmp_path / "last-ran"), 4) for x in range(5)]
    out = _ray_parallel_map(_square_item_0_last, jobs,
                            ResourceRequest(num_workers=2, cpus_per_worker=0.5),
                            lambda i, r: seen.append((i, r)))
    assert out == [0, 1, 4, 9, 16]                      # results keep the items' order
    assert seen.index((0, 0)) > seen.index((4, 16))     # reported as they finish
    assert sorted(seen) == [(i, i * i) for i in range(5)]


def _sleep_then_stamp(job):
    """Note which process runs the item, sleep, then record when it ended."""
    x, folder = job
    Path(folder, f"pid-{os.getpid()}").touch()
    time.sleep(0.4)
    Path(folder, f"item-{x}").write_text(repr(time.time()))
    return x


def _fail_on_item_2(job):
    if job == 2:
        raise ValueError("item 2 is bad")
    time.sleep(0.1)
    return job


def test_ray_parallel_map_keeps_its_cpus_between_items(tmp_path, ray_session):
    """A 1-CPU task queued while a 2-worker map runs on the 2 CPUs waits until a worker has
    run out of items: the map's workers keep their CPUs from one item to the next. (With a
    task per item the queued task took the CPU freed by the first item, and the map ran on
    one worker.)"""
    import threading

    import ray

    from retro.platform.execute import _ray_parallel_map
    from retro.platform.spec.model import ResourceRequest

    started = tmp_path / "competitor-started"

    def competitor():
        deadline = time.time() + 60
        while len(list(tmp_path.glob("pid-*"))) < 2 and time.time() < deadline:
            time.sleep(0.01)  # queue it once both of the map's workers hold a CPU
        ray.get(ray.remote(lambda: started.write_text(repr(time.time())))
                .options(num_cpus=1).remote())

    thread = threading.Thread(target=competitor)
    thread.start()
    out = _ray_parallel_map(_sleep_then_stamp, [(x, str(tmp_path)) for x in range(6)],
                            ResourceRequest(num_workers=2, cpus_per_worker=1))
    thread.join(timeout=60)
    assert out == list(range(6))
    ends = sorted(float((tmp_path / f"item-{x}").read_text()) for x in range(6))
    # it may start once a worker has run out of items (the second-last end), never before;
    # with a task per item it started when the first item ended
    assert float(started.read_text()) >= ends[-2] - 0.05


def test_ray_parallel_map_raises_the_first_failure_and_stops_the_workers(tmp_path,
                                                                         ray_session):
    import ray

    from retro.platform.execute import _ray_parallel_map
    from retro.platform.spec.model import ResourceRequest

    with pytest.raises(Exception, match="item 2 is bad"):
        _ray_parallel_map(_fail_on_item_2, list(range(40)),
                          ResourceRequest(num_workers=2, cpus_per_worker=1))
    # the CPUs are free again: a 2-CPU task runs at once
    assert ray.get(ray.remote(lambda: 7).options(num_cpus=2).remote(), timeout=30) == 7
