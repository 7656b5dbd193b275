"""A real multi-node Ray cluster on this machine (issue 15 points 6, 7): a head and a worker
node, each started by `ray start --block` with its own CPU budget, all traffic on loopback;
`retro run` and Ray Train drivers join it by address, from subprocesses (this pytest process
may hold an embedded Ray of its own).

Order matters and is kept by the file: the DAG run, the fit across both nodes, the store
check (a third node that does not see the store), then the worker node killed mid-fit.
Ray start-up is slow on a loaded machine, so the waits are generous.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.platform.helpers import cli, events

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
STEPS, EVERY = 24, 4


_HANDED_OUT: set[int] = set()


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports, none handed out before in this session: the sockets stay
    bound until all n are picked (a closed port can come back from the very next bind, which
    once gave the GCS and the runtime-env agent the same port)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    _HANDED_OUT.update(ports)
    return ports


def _free_port() -> int:
    return _free_ports(1)[0]


def _ports() -> list[str]:
    """Each node's own ports: two raylets on one machine must not share any."""
    names = ("node-manager-port", "object-manager-port", "metrics-export-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")
    return [f"--{n}={p}" for n, p in zip(names, _free_ports(len(names)))]


class LoopbackCluster:
    """`ray start --block` processes (head first); `env` is every node's environment."""

    def __init__(self, tmp: Path):
        self.tmp, self.port = tmp, _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                    # a lost node is noticed within seconds, and a worker group that cannot
                    # be placed again gives up after 20 s per attempt (not 60)
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
                    "RAY_health_check_failure_threshold": "3",
                    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20",
                    "OMP_NUM_THREADS": "1"}
        self.nodes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, num_cpus: int, resources: dict[str, float],
              wrap: list[str] | None = None) -> None:
        """The head (`ray start --head --block`) first, then worker nodes (ray_node.py)."""
        if not self.nodes:
            cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                   "--disable-usage-stats", f"--port={self.port}", "--include-dashboard=false",
                   f"--temp-dir={self.tmp / 'ray'}", "--object-store-memory=157286400",
                   f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}",
                   *_ports()]
        else:
            cmd = [sys.executable, str(Path(__file__).with_name("ray_node.py")), self.address,
                   f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}"]
        log = open(self.tmp / f"{name}.log", "w")
        self.nodes[name] = subprocess.Popen((wrap or []) + cmd, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, cwd=self.tmp,
                                            start_new_session=True)

    def kill(self, name: str) -> None:
        """SIGKILL the node's whole process group: raylet, its workers, everything."""
        proc = self.nodes.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)

    def stop(self) -> None:
        for name in reversed(list(self.nodes)):
            proc = self.nodes[name]
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.nodes.clear()

    def driver(self, code: str, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
        """Run `code` in a Python driver joined to the cluster (`ray` and `addr` defined)."""
        head = ("import ray\nfrom retro.platform.scheduler import connect_ray\n"
                f"addr = {self.address!r}\nconnect_ray(addr)\n")
        return subprocess.run([sys.executable, "-c", head + textwrap.dedent(code)], cwd=ROOT,
                              env={**self.env, **env}, capture_output=True, text=True,
                              timeout=timeout)

    def wait_nodes(self, alive: int, timeout: int = 300) -> list[dict]:
        """Block until exactly `alive` nodes are alive; their ray.nodes() entries. Fails at
        once if a node process exits."""
        code = f"""
            import json, time
            t0 = time.time()
            while True:
                nodes = [n for n in ray.nodes() if n["Alive"]]
                if len(nodes) == {alive} or time.time() - t0 > {timeout}:
                    break
                time.sleep(0.5)
            print(json.dumps([{{"id": n["NodeID"], "resources": n["Resources"]}}
                              for n in nodes]))
            """
        head = ("import ray\nfrom retro.platform.scheduler import connect_ray\n"
                f"addr = {self.address!r}\nconnect_ray(addr)\n")
        proc = subprocess.Popen([sys.executable, "-c", head + textwrap.dedent(code)], cwd=ROOT,
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        while proc.poll() is None:
            dead = [n for n, p in self.nodes.items() if p.poll() is not None]
            if dead:
                proc.kill()
                pytest.fail(f"Ray node(s) {dead} exited:\n{self.logs()}")
            time.sleep(0.5)
        stdout, stderr = proc.communicate()
        assert proc.returncode == 0, stderr[-3000:]
        nodes = json.loads(stdout.strip().splitlines()[-1])
        assert len(nodes) == alive, (nodes, self.logs())
        return nodes

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}"
                         for p in self.tmp.glob("*.log"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LoopbackCluster(tmp_path_factory.mktemp("cluster"))
    c.start("head", 1, {"head": 1})
    c.start("worker", 1, {"worker": 1})
    try:
        c.ids = {("head" if "head" in n["resources"] else "worker"): n["id"]
                 for n in c.wait_nodes(2)}
        yield c
    finally:
        c.stop()


def _run(cluster: LoopbackCluster, spec: Path, timeout: int = 600):
    return cli("run", spec, "-o", f"resources.ray_address={cluster.address}",
               env={"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, timeout=timeout)


def _quiz_spec(tmp: Path, store: Path) -> Path:
    import yaml

    spec = tmp / "quiz.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "quiz", "recipe": {"type": "toy-quiz", "n": 8}, "tracking": "none",
        "store": {"path": str(store), "runs": str(tmp / "runs")}}))
    return spec


def test_dag_stages_land_on_both_nodes(cluster, tmp_path):
    """Three independent root stages of 1 CPU on two 1-CPU nodes: Ray must run two at once,
    one per node; every done event names its node, and the run is complete."""
    r = _run(cluster, _quiz_spec(tmp_path, tmp_path / "store"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:] + cluster.logs()
    done = [e for e in events(tmp_path / "runs") if e["event"] == "done"]
    assert len(done) == 6
    assert {e["node"]["id"] for e in done} == set(cluster.ids.values())
    assert {e["node"]["ip"] for e in done} == {"127.0.0.1"}


def _rows(tmp: Path) -> tuple[Path, Path]:
    from tests.training.helpers import VOCAB

    rng = np.random.default_rng(0)
    walk = np.cumsum(rng.integers(-2, 3, (48, 64)), axis=1) % VOCAB
    np.save(tmp / "train.npy", walk[:40].astype(np.uint16))
    np.save(tmp / "valid.npy", walk[40:].astype(np.uint16))
    return tmp / "train.npy", tmp / "valid.npy"


FIT = """
    import dataclasses, functools, json, os, sys
    from pathlib import Path
    from retro.components.training.launcher import launch
    from tests.training.helpers import job

    def build(inner, out):
        # runs in each Ray Train worker: record the node it landed on
        Path(out, f"node-{{os.getpid()}}").write_text(ray.get_runtime_context().get_node_id())
        return inner()

    out = Path({out!r})
    j = job(out, Path({train!r}), Path({valid!r}), steps={steps}, global_batch=4, lr=3e-3,
            checkpoint_interval={every}, micro_batch=2, max_failures=1)
    j = dataclasses.replace(j, model=functools.partial(build, j.model, str(out)))
    try:
        summary = launch(j, num_workers=2, cpus_per_worker=1, storage=Path({work!r}))
    except Exception as e:
        print("FAILED", type(e).__name__, e)
        sys.exit(3)
    print(json.dumps(summary, default=float))
"""


def _fit_code(tmp: Path, steps: int) -> tuple[str, Path, Path]:
    train, valid = _rows(tmp)
    out, work = tmp / "out", tmp / "work"
    out.mkdir()
    return FIT.format(out=str(out), train=str(train), valid=str(valid), steps=steps,
                      every=EVERY, work=str(work)), out, work


def test_ray_train_fit_puts_one_worker_on_each_node(cluster, tmp_path):
    code, out, _ = _fit_code(tmp_path, steps=4)
    r = cluster.driver(code)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 4
    nodes = [p.read_text() for p in out.glob("node-*")]
    assert sorted(nodes) == sorted(cluster.ids.values())


def test_a_node_that_does_not_see_the_store_stops_the_run(cluster, tmp_path):
    """A third node whose view of the store path is another directory (a private mount
    namespace with an empty tmpfs over it: the shared mount missing on that node). The run
    names that node, exits 2 and runs nothing."""
    store = tmp_path / "store"
    store.mkdir()
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("needs mount namespaces (unshare -m) to give a node another view of the "
                    "store")
    mount = f"mount -t tmpfs none {store} && exec \"$@\""
    cluster.start("blind", 0, {"blind": 1},
                  wrap=["unshare", "-m", "--propagation", "private", "sh", "-c", mount, "sh"])
    try:
        blind = [n["id"] for n in cluster.wait_nodes(3) if "blind" in n["resources"]][0]
        r = _run(cluster, _quiz_spec(tmp_path, store))
    finally:
        cluster.kill("blind")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    err = " ".join(r.stderr.split())
    assert f"node {blind[:12]} (127.0.0.1): cannot read the driver's probe" in err, err
    assert cluster.ids["head"][:12] not in err and cluster.ids["worker"][:12] not in err
    assert "shared filesystem" in err
    assert not [e for e in events(tmp_path / "runs") if e["event"] == "started"]
    assert not [p for p in store.iterdir() if not p.name.startswith(".")]


def test_worker_node_killed_mid_fit_fails_naming_the_lost_node(cluster, tmp_path):
    """The worker node dies after a checkpoint: the 2-worker group cannot be placed on the
    one remaining 1-CPU node, so after its retries the fit fails with a message naming the
    lost node and its resources, and keeps the checkpoint for a later re-run."""
    cluster.wait_nodes(2)                      # the blind node of the last test is gone
    code, out, work = _fit_code(tmp_path, steps=STEPS)
    proc = subprocess.Popen([sys.executable, "-c", (
        "import ray\nfrom retro.platform.scheduler import connect_ray\n"
        f"addr = {cluster.address!r}\nconnect_ray(addr)\n" + textwrap.dedent(code))],
        cwd=ROOT, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    snapshot = work / "ray-train" / "checkpoint_manager_snapshot.json"
    metrics = out / "train_metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < 600 and proc.poll() is None:
        if snapshot.exists() and "checkpoint_" in snapshot.read_text() and metrics.exists() \
                and any(json.loads(x).get("step", 0) >= EVERY + 1
                        for x in metrics.read_text().splitlines() if x.strip()):
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the fit ended before the node could be killed"
    cluster.kill("worker")
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 3, stdout[-2000:] + stderr[-3000:]
    msg = " ".join(stdout.split())
    lost = cluster.ids["worker"]
    assert f"lost node {lost[:12]} (127.0.0.1, CPU 1" in msg, msg
    assert "2 workers x (CPU 1)" in msg and "re-run" in msg
    assert cluster.ids["head"][:12] not in msg
    assert list((work / "ray-train").glob("checkpoint_*")), "the checkpoint was not kept"
