"""Walks a plan on Ray: ready stages become Ray tasks with their declared resources.

Independent stages and sweep variants run concurrently. A failed stage stops only its
dependents; everything else finishes. The driver holds no results in memory: stages exchange
artifacts through the store.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from retro.platform.errors import StageFailed, UserError
from retro.platform.execute import StagePayload, execute_stage
from retro.platform.plan import Plan, PlannedStage
from retro.platform.tracking import TrackingInfo
import shutil
import uuid

EventSink = Callable[[str, PlannedStage, dict[str, Any]], None]


@dataclass
class RunOutcome:
    states: dict[str, str] = field(default_factory=dict)        # id -> cached/done/failed/...
    failures: list[StageFailed] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and all(s in ("cached", "done") for s in self.states.values())


def ray_env() -> None:
    """Quiet, local-friendly Ray defaults (each can be overridden by the environment)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_TMPDIR", os.path.join(tempfile.gettempdir(), f"rr{os.getuid()}"))
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # A training stage's workers wait for the CPUs other stages of the plan hold (a fit beside
    # an eval on a 2-core machine) instead of failing after Ray Train's 60 s default.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "3600")


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join `address` / RAY_ADDRESS, or start an embedded local Ray. True if we started it."""
    ray_env()
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # A cluster on this machine's loopback (tests, one-box clusters): the driver must say
        # so, or Ray looks for a raylet on the machine's outward address and finds none.
        host = address.split("://")[-1].rsplit(":", 1)[0]
        local = {"_node_ip_address": "127.0.0.1"} if host in ("127.0.0.1", "localhost") \
            else {}
        ray.init(address=address, log_to_driver=False, logging_level="ERROR", **local)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR")
    return True


def run_plan(plan: Plan, store_root: Path, log_dir: Path, *, run_name: str,
             tracking: dict[str, list[dict]], configs: dict[str, dict],
             on_event: EventSink, max_concurrent: int | None = None,
             check_store: bool = True) -> RunOutcome:
    """Execute every non-cached stage of `plan` on the connected Ray cluster.

    `check_store`: first prove that every node sees the store (`check_store_reachable`);
    pointless on an embedded Ray that this process started.
    """
    out = RunOutcome({s.id: ("cached" if s.cached else "pending") for s in plan.stages})
    for s in plan.stages:
        if s.cached:
            on_event("cached", s, {})
    if not plan.to_run:
        return out
    import ray

    if check_store:
        check_store_reachable(Path(store_root))

    remote = ray.remote(execute_stage)
    inflight: dict[Any, PlannedStage] = {}
    while True:
        for node in plan.stages:
            if max_concurrent and len(inflight) >= max_concurrent:
                break
            if out.states[node.id] == "pending" and all(
                    out.states[i] in ("cached", "done") for i in node.inputs.values()):
                ref = remote.options(name=node.id, max_retries=0, **_task_resources(node)) \
                    .remote(_payload(plan, node, store_root, log_dir, run_name, tracking,
                                     configs))
                inflight[ref] = node
                out.states[node.id] = "running"
                on_event("started", node, {"log": str(log_dir / f"{node.id}.log")})
        if not inflight:
            break
        done, _ = ray.wait(list(inflight), num_returns=1)
        for ref in done:
            node = inflight.pop(ref)
            try:
                result = ray.get(ref)
                out.states[node.id] = "done" if result["status"] == "done" else "cached"
                on_event(out.states[node.id], node, result)
            except Exception as e:  # noqa: BLE001 - every failure becomes a StageFailed
                failure = _as_stage_failed(e, node, log_dir)
                out.failures.append(failure)
                out.states[node.id] = "failed"
                on_event("failed", node, {"error": failure.cause, "log": failure.log_file})
                for blocked in _dependents(plan, node.id):
                    if out.states[blocked.id] == "pending":
                        out.states[blocked.id] = "blocked"
                        on_event("blocked", blocked, {"because": node.id})
    return out


PROBES = ".probes"
PROBE_TIMEOUT_S = float(os.environ.get("RETRO_STORE_PROBE_TIMEOUT_S", "180"))


def check_store_reachable(store_root: Path, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Every alive node that can receive work (CPUs or GPUs) reads a probe this driver wrote
    into the store and writes one back, which the driver must then see: stages exchange
    artifacts only through the store, so a node with another view of `store.path` would
    compute into a directory nobody else reads.

    Raises:
        UserError: naming each node that could not (exit 2); nothing has run.
    """

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    probe = store_root / PROBES / token
    probe.mkdir(parents=True)
    (probe / "driver").write_text(token)
    nodes = [n for n in ray.nodes() if n.get("Alive") and _can_receive_work(n)]
    task = ray.remote(_probe_store)
    refs = {task.options(num_cpus=0, max_retries=0, scheduling_strategy=(
        NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))).remote(str(store_root), token):
        n for n in nodes}
    _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    problems = []
    for ref, n in refs.items():
        where = f"node {n['NodeID'][:12]} ({n.get('NodeManagerAddress', '?')})"
        if ref in pending:
            ray.cancel(ref, force=True)
            problems.append(f"{where}: no answer within {timeout_s:.0f}s")
            continue
        try:
            error = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - the node's own failure, reported as such
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}"
        if error is None and not (probe / n["NodeID"]).is_file():
            error = "wrote its probe back, but not into the driver's store"
        if error:
            problems.append(f"{where}: {error}")
    shutil.rmtree(probe, ignore_errors=True)
    if problems:
        raise UserError(
            f"the artifact store {store_root} is not the same directory on every node of the "
            "Ray cluster; nothing ran:\n" + "\n".join(f"  - {p}" for p in problems)
            + "\n    hint: mount one shared filesystem (NFS, Lustre, EFS) at the same path on "
            "every node and set store.path to it (README, 'Joining a Ray cluster')")


def _can_receive_work(node: dict[str, Any]) -> bool:
    """Offers a resource tasks can ask for (CPU, GPU, custom), not only memory and labels."""
    return any(v > 0 for k, v in node.get("Resources", {}).items()
               if k not in ("memory", "object_store_memory")
               and not k.startswith(("node:", "accelerator_type:")))


def _probe_store(root: str, token: str) -> str | None:
    """On one node: read the driver's probe, write this node's; an error message or None."""
    import ray

    probe = Path(root) / PROBES / token
    try:
        seen = (probe / "driver").read_text()
    except OSError as e:
        return f"cannot read the driver's probe {probe / 'driver'} ({e.strerror})"
    if seen != token:
        return f"{probe / 'driver'} holds another probe"
    try:
        (probe / ray.get_runtime_context().get_node_id()).write_text(token)
    except OSError as e:
        return f"cannot write into {probe} ({e.strerror})"
    return None


def _task_resources(node: PlannedStage) -> dict[str, Any]:
    res = node.resources
    if node.distributed or res.num_workers > 1:  # its workers reserve; the launcher does not
        return {"num_cpus": 0}
    out: dict[str, Any] = {"num_cpus": res.cpus_per_worker, "num_gpus": res.gpus_per_worker}
    if res.memory_gb:
        out["memory"] = int(res.memory_gb * 2**30)
    return out


def _payload(plan: Plan, node: PlannedStage, store_root: Path, log_dir: Path, run_name: str,
             tracking: dict[str, list[dict]], configs: dict[str, dict]) -> StagePayload:
    first = node.variants[0]
    return StagePayload(
        node=node, store_root=str(store_root), log_file=str(log_dir / f"{node.id}.log"),
        inputs={slot: (plan.by_id(i).stage, plan.by_id(i).key) for slot, i in node.inputs.items()},
        tracking=tracking[first],
        info=TrackingInfo(run_name, str(log_dir.parent), node.name, node.key, node.variants,
                          configs[first]))


def _dependents(plan: Plan, stage_id: str) -> list[PlannedStage]:
    out, frontier = [], {stage_id}
    for node in plan.stages:  # topological order: one pass finds the transitive closure
        if frontier & set(node.inputs.values()):
            out.append(node)
            frontier.add(node.id)
    return out


def _as_stage_failed(e: Exception, node: PlannedStage, log_dir: Path) -> StageFailed:
    cause = getattr(e, "cause", None)
    if isinstance(e, StageFailed) and not isinstance(cause, BaseException):
        return e
    if isinstance(cause, StageFailed):
        return cause
    text = str(cause or e).strip().splitlines()
    return StageFailed(node.name, node.key, f"{type(e).__name__}: {text[-1] if text else ''}",
                       str(log_dir / f"{node.id}.log"))
