"""Executing one planned stage: lock, compute into a temp dir, commit. Runs inside a Ray task."""

from __future__ import annotations

import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retro.platform.datahash import check_unchanged
from retro.platform.errors import StageFailed, UserError
from retro.platform.plan import PlannedStage
from retro.platform.registry import registry
from retro.platform.runs import package_versions
from retro.platform.spec.model import ResourceRequest
from retro.platform.stage import StageContext, serial_map, stage_logger
from retro.platform.store import ArtifactStore
from retro.platform.secrets import redact, restore_env_placeholders
from retro.platform.tracking import TrackingInfo, build_trackers


@dataclass
class StagePayload:
    node: PlannedStage
    store_root: str
    log_file: str
    inputs: dict[str, tuple[str, str]]         # slot -> (stage type, key)
    tracking: list[dict[str, Any]] = field(default_factory=list)
    info: TrackingInfo | None = None


def execute_stage(p: StagePayload) -> dict[str, Any]:
    """Compute `p.node` unless its artifact exists; returns {status, seconds, summary}."""
    registry.load_plugins()
    store = ArtifactStore(p.store_root)
    node = p.node
    if store.exists(node.stage, node.key) and not node.force:
        return {"status": "cached", "node": ray_node()}
    with store.lock(node.stage, node.key):
        if store.exists(node.stage, node.key) and not node.force:  # finished while we waited
            return {"status": "cached", "node": ray_node()}
        return {**_compute(p, store), "node": ray_node()}


def ray_node() -> dict[str, str] | None:
    """The Ray node this process runs on ({id, ip}), for the run's events; None outside Ray."""
    import ray

    if not ray.is_initialized():
        return None
    return {"id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address()}


def _compute(p: StagePayload, store: ArtifactStore) -> dict[str, Any]:
    node = p.node
    log_file = Path(p.log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log = stage_logger(node.id, log_file)
    tmp = store.new_tmp(node.stage, node.key)
    work = store.work_dir(node.stage, node.key)
    (work / "metrics.jsonl").unlink(missing_ok=True)
    tracker = build_trackers(p.tracking, p.info) if p.info else build_trackers([], None)
    sdef = registry.get("stage", node.stage).obj
    ctx = StageContext(
        name=node.name, stage=node.stage, key=node.key,
        params=sdef.params.model_validate(node.params),
        inputs={slot: store.get(*ref) for slot, ref in p.inputs.items()},
        out_dir=tmp, work_dir=work, seed=node.seed, resources=node.resources, log=log,
        tracker=tracker, variants=list(node.variants), _parallel_map=_ray_parallel_map)
    log.info("stage %s (%s) key %s starting; params %s", node.name, node.stage, node.key,
             redact(node.params))
    t0 = time.time()
    try:
        summary = sdef(ctx) or {}
        seconds = time.time() - t0
        check_unchanged(node.name, node.data)  # data rewritten since it was keyed: commit nothing
        if (work / "metrics.jsonl").exists():
            shutil.copy(work / "metrics.jsonl", tmp / "metrics.jsonl")
        artifact = store.commit(tmp, node.stage, node.key, {
            "name": node.name, "version": node.version,
            "params": restore_env_placeholders(node.params),
            "inputs": {slot: {"stage": s, "key": k} for slot, (s, k) in p.inputs.items()},
            "seconds": round(seconds, 3), "summary": {**ctx.summary, **summary},
            "packages": package_versions(),
            "data": {loc: d.record() for loc, d in node.data.items()}}, replace=node.force)
        tracker.log_metrics({f"summary/{k}": v for k, v in summary.items()
                             if isinstance(v, (int, float))})
        tracker.log_artifact(artifact, {slot: f"{s}/{k}" for slot, (s, k) in p.inputs.items()})
        tracker.finish("success")
        log.info("stage %s done in %.1fs", node.name, seconds)
        return {"status": "done", "seconds": seconds, "summary": {**ctx.summary, **summary}}
    except BaseException as e:  # noqa: BLE001 - reported, then re-raised as StageFailed
        log.error("stage %s failed:\n%s", node.name, traceback.format_exc())
        shutil.rmtree(tmp, ignore_errors=True)
        tracker.finish("failed")
        cause = f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e)
        raise StageFailed(node.name, node.key, cause, str(log_file),
                          user_error=isinstance(e, UserError)) from None


def _ray_parallel_map(fn: Any, items: list, res: ResourceRequest,
                      on_result: Any = None) -> list:
    """Run `fn` over `items` on `res.num_workers` Ray tasks; results in the items' order,
    `on_result(i, result)` as each item finishes.

    Each worker is one task that keeps its CPUs for the whole map and takes the next item from
    a shared feed (an actor) when it finishes one; a streaming generator yields each result.
    With one task per item, a CPU freed between two items went to whatever stage had queued
    meanwhile: the embed stage of rag-eval-smollm2 lost its second worker to the QA
    evaluations for its whole run (docs/benchmarks.md)."""
    import ray

    if not ray.is_initialized():
        return serial_map(fn, items, on_result)
    n = min(res.num_workers, len(items))
    feed = ray.remote(_Feed).options(num_cpus=0).remote(n, len(items))
    ray.get(feed.__ray_ready__.remote())  # started, so no worker waits on it (see _pull_items)
    task = ray.remote(_pull_items).options(num_cpus=res.cpus_per_worker,
                                           num_gpus=res.gpus_per_worker, max_retries=0)
    shared = ray.put(items)
    workers = [task.remote(fn, shared, feed, first) for first in range(n)]
    results: dict[int, Any] = {}
    try:
        while workers:
            ready = ray.wait(workers, num_returns=1)[0][0]
            try:
                i, result = ray.get(next(ready))
            except StopIteration:
                workers.remove(ready)
                continue
            results[i] = result
            if on_result is not None:
                on_result(i, result)
    except BaseException:
        for w in workers:  # a failed item fails the map: stop the other workers
            ray.cancel(w, force=True)
        raise
    finally:
        ray.kill(feed)
    return [results[i] for i in range(len(items))]


class _Feed:
    """Hands out item indices from `start` on, each once, to whichever worker asks (an actor
    with 0 CPUs); worker w starts with item w."""

    def __init__(self, start: int, n: int):
        self.next_index, self.n = start, n

    def take(self) -> int | None:
        if self.next_index >= self.n:
            return None
        self.next_index += 1
        return self.next_index - 1


def _pull_items(fn: Any, items: list, feed: Any, first: int):
    """One worker: `(i, fn(items[i]))` for item `first`, then for each index the feed gives
    it, until none is left.

    The next index is asked for before the current item runs, so the answer is there when
    the item ends and `ray.get` does not wait: Ray lends a waiting task's CPUs to queued
    tasks, which would hand them to another stage between two items (or, before the first
    item, while the feed actor starts)."""
    import ray

    i: int | None = first
    while i is not None:
        ahead = feed.take.remote()
        result = fn(items[i])
        yield i, result
        i = ray.get(ahead)
