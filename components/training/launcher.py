"""Launch a `TrainJob` on Ray Train (`TorchTrainer`) from inside a stage, streaming its metrics.

Workers cannot reach the stage's context, so rank 0 appends metrics to
`<job.out_dir>/train_metrics.jsonl` and a thread in the stage process tails that file and forwards
every new row as it lands (`on_row`). Checkpoints go to `RunConfig(storage_path=<work_dir>)`:
`FailureConfig(max_failures)` restarts a failed worker group from the latest one, and a later
attempt of the same stage (same work dir and run name) resumes from it too.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable

from retro.components.training.checkpoint import LocalRuntime, RayRuntime
from retro.components.training.loop import TrainJob, check_global_batch, train
from retro.platform.errors import UserError

RUN_NAME = "ray-train"
SUMMARY_FILE = "summary.json"


def launch(job: TrainJob, *, num_workers: int, cpus_per_worker: float = 1.0,
           gpus_per_worker: float = 0.0, storage: Path,
           on_row: Callable[[dict[str, Any]], None] | None = None,
           use_ray: bool | None = None) -> dict[str, Any]:
    """Train `job` to completion (resuming from `storage` if it holds a checkpoint).

    Args:
        job: the training job (picklable).
        num_workers, cpus_per_worker, gpus_per_worker: the Ray Train scaling.
        storage: persistent directory for checkpoints (the stage's work_dir).
        on_row: receives every metrics row (`kind` train/eval/resume), in order, once.
        use_ray: force (True) or avoid (False) Ray Train; None: Ray Train when Ray is running.

    Returns:
        The rank-0 summary (steps, resumed_from, final train/val metrics).

    Raises:
        UserError: the training failed for good (after `max_failures` restarts).
    """
    storage = Path(storage).absolute()
    check_global_batch(job, num_workers)
    if use_ray is None:
        import ray

        use_ray = ray.is_initialized()
    with MetricsTail(job.metrics_file, on_row or (lambda row: None)):
        if not use_ray:
            if num_workers > 1:
                raise UserError(f"{job.name}: {num_workers} workers need a running Ray")
            summary = train(job, LocalRuntime(storage / RUN_NAME))
        else:
            _fit(job, num_workers, cpus_per_worker, gpus_per_worker, storage)
            summary = json.loads((Path(job.out_dir) / SUMMARY_FILE).read_text())
    return summary


def _fit(job: TrainJob, num_workers: int, cpus: float, gpus: float, storage: Path) -> None:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = gpus > 0
    resources = {"CPU": cpus, **({"GPU": gpus} if use_gpu else {})}
    trainer = TorchTrainer(
        _worker, train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=RUN_NAME, storage_path=str(storage),
                             # a worker group that cannot be placed again (a lost node) is
                             # retried as often as a failed one, then fails: never a hang
                             failure_config=FailureConfig(
                                 max_failures=job.run.max_failures,
                                 controller_failure_limit=job.run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    nodes = _alive_nodes()
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001 - Ray wraps the worker's error; unwrap for the user
        cause = _root_cause(e)
        if isinstance(cause, UserError):
            raise cause from None
        lost = [n for i, n in nodes.items() if i not in _alive_nodes()]
        if lost:
            raise UserError(lost_nodes_message(job.name, lost, num_workers, resources,
                                               storage)) from e
        raise RuntimeError(f"{job.name}: Ray Train failed after {job.run.max_failures} "
                           f"restart(s): {type(cause).__name__}: {cause}") from e


def _alive_nodes() -> dict[str, dict[str, Any]]:
    import ray

    return {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}


def lost_nodes_message(name: str, lost: list[dict[str, Any]], num_workers: int,
                       per_worker: dict[str, float], storage: Path) -> str:
    """Which nodes left during the fit, what they held, and how to go on."""
    held = "; ".join(f"node {n['NodeID'][:12]} ({n.get('NodeManagerAddress', '?')}, "
                     + ", ".join(f"{k} {v:g}" for k, v in sorted(n.get("Resources", {}).items())
                                 if k in ("CPU", "GPU", "memory") and v) + ")" for n in lost)
    need = ", ".join(f"{k} {v:g}" for k, v in per_worker.items())
    return (f"{name}: the Ray cluster lost {held} during the fit, and the remaining nodes "
            f"cannot place {num_workers} workers x ({need}) again; the last checkpoint is kept "
            f"in {storage}: re-run when the cluster has those resources again (the fit "
            f"resumes from it), or lower resources.stages.{name}.num_workers")


def _worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point."""

    job: TrainJob = config["job"]
    runtime = RayRuntime()
    summary = train(job, runtime)
    if runtime.rank == 0:
        (Path(job.out_dir) / SUMMARY_FILE).write_text(json.dumps(summary, default=float))


def _root_cause(e: BaseException) -> BaseException:
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        errors = getattr(e, "worker_failures", None) or getattr(e, "errors", None)
        if isinstance(errors, dict) and errors:
            inner = next(iter(errors.values()))
        if not isinstance(inner, BaseException):
            return e
        e = inner
    return e


class MetricsTail:
    """Forwards rows appended to a JSONL file, from a background thread, each (kind, step) once.

    A row seen again (the steps a restarted worker group redoes after its last checkpoint,
    or earlier attempts' rows replayed by a resumed stage) is skipped: determinism makes the
    repeat identical.
    """

    def __init__(self, path: Path, on_row: Callable[[dict[str, Any]], None],
                 every_s: float = 0.5):
        self.path, self.on_row, self.every_s = Path(path), on_row, every_s
        self.offset, self.seen = 0, set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="metrics-tail")
        self.error: BaseException | None = None

    def __enter__(self) -> "MetricsTail":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        self.poll()                 # whatever landed after the thread's last look
        if self.error and not exc[0]:
            raise self.error

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                self.poll()
            except BaseException as e:  # noqa: BLE001 - surfaced in __exit__
                self.error = e
                return

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            while True:
                line = fh.readline()
                if not line.endswith(b"\n"):  # partial line: read it next time
                    break
                self.offset += len(line)
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:   # a writer killed mid-line; the rest is fine
                    continue
                ident = (row.get("kind"), row.get("step"))
                if ident in self.seen:
                    continue
                self.seen.add(ident)
                self.on_row(row)
