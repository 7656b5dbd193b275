"""The stage contract: what a recipe asks for, and what a stage function receives.

A stage is a function registered under kind `stage`:

    @register("stage", "chunk-db", version="1")
    def chunk_db(ctx: StageContext) -> dict | None:
        tokens = ctx.inputs["tokens"]            # an Artifact
        ...write files into ctx.out_dir...
        return {"n_chunks": n}                   # summary metrics for the manifest

It is pure: its output depends only on `ctx.params` (the spec fields it reads), its input
artifacts and its version, which is exactly what its content key hashes. It never reads the cwd
or global paths and never imports the scheduler; it parallelises through `ctx.parallel_map`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from retro.platform.spec.model import ResourceRequest
from retro.platform.store import Artifact


@dataclass(frozen=True)
class StageCall:
    """One node a recipe asks for, before keys are computed.

    Attributes:
        name: node name, unique within a variant (`embed`, `retro-fit`, `eval-ppl-gate0`);
            also the key into `resources.stages`.
        stage: registered stage type that computes it.
        reads: param name -> dotted spec path. These values (and only these) reach the stage
            and its key.
        consts: recipe-chosen constant params (also part of the key).
        inputs: input slot -> name of another call of the same variant.
        distributed: the stage spreads its own work (shards or Ray Train workers), so its
            launching task reserves no CPU itself.
        omit: param name -> keys dropped from that (mapping) value before the stage sees it,
            e.g. `{"model": ["freeze"]}` for a stage the freeze policy cannot affect: the
            dropped fields neither reach the stage nor enter its key.
    """

    name: str
    stage: str
    reads: dict[str, str] = field(default_factory=dict)
    consts: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    distributed: bool = False
    omit: dict[str, tuple[str, ...]] = field(default_factory=dict)


class Tracker(Protocol):
    """Where a stage's configs, metrics and artifacts go (W&B, JSONL, stdout, ...)."""

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, artifact: Artifact, lineage: dict[str, str]) -> None: ...

    def finish(self, status: str = "success") -> None: ...


ParallelMap = Callable[[Callable[[Any], Any], list, ResourceRequest], list]


@dataclass
class StageContext:
    """Everything a stage may use. Built by the platform, one per execution."""

    name: str
    stage: str
    key: str
    params: dict[str, Any]
    inputs: dict[str, Artifact]
    out_dir: Path
    work_dir: Path
    seed: int
    resources: ResourceRequest
    log: logging.Logger
    tracker: Tracker
    variants: list[str] = field(default_factory=list)
    _parallel_map: ParallelMap | None = None
    _step: int = 0
    summary: dict[str, Any] = field(default_factory=dict)

    def parallel_map(self, fn: Callable[[Any], Any], items: Iterable[Any],
                     on_result: Callable[[int, Any], None] | None = None) -> list:
        """`[fn(x) for x in items]`, spread over `resources.num_workers` Ray tasks when > 1.

        `fn` must be a module-level function (it is pickled to workers); results keep order.
        `on_result(i, result)` runs in this process as each item finishes (e.g. progress).
        """
        items = list(items)
        if self._parallel_map is None or self.resources.num_workers <= 1 or len(items) <= 1:
            return serial_map(fn, items, on_result)
        return self._parallel_map(fn, items, self.resources, on_result)

    def log_metrics(self, step: int | None = None, **metrics: float) -> None:
        """Stream metrics: to `metrics.jsonl` in the artifact (the local mirror) and trackers."""
        step = self._step if step is None else step
        self._step = step + 1
        row = {"step": step, "time": time.time(), **metrics}
        with open(self.work_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row, default=float) + "\n")
        self.tracker.log_metrics(metrics, step=step)

    def progress(self, total: int | None, desc: str, every_s: float = 2.0,
                 start: int = 0) -> "Progress":
        """A progress counter written to the stage log (and stderr when interactive)."""
        return Progress(total, desc, self.log, every_s=every_s, start=start)

    def timer(self, name: str) -> Any:
        """`with ctx.timer("forward"):` adds the block's wall time to the manifest's
        `summary.time_s[name]` (names: forward, search, io, ...; platform/timing.py)."""
        from retro.platform.timing import Timings

        return Timings(self.summary.setdefault("time_s", {}))(name)

    def add_times(self, seconds: dict[str, float] | None) -> None:
        """Add time measured elsewhere (a shard's or worker's `Timings.as_dict()`)."""
        from retro.platform.timing import merge

        self.summary["time_s"] = merge(self.summary.get("time_s"), seconds)


def serial_map(fn: Callable[[Any], Any], items: list,
               on_result: Callable[[int, Any], None] | None = None) -> list:
    """`parallel_map` in this process."""
    out = []
    for i, x in enumerate(items):
        out.append(fn(x))
        if on_result is not None:
            on_result(i, out[-1])
    return out


class Progress:
    """Throttled progress lines: `embed: 12000/48000 (25%) 410/s eta 88s`."""

    def __init__(self, total: int | None, desc: str, log: logging.Logger, every_s: float = 2.0,
                 start: int = 0):
        """`start`: work already done before this counter (a resumed stage); it counts towards
        the total but not towards the rate."""
        self.total, self.desc, self.log, self.every_s = total, desc, log, every_s
        self.start = self.done = start
        self.t0, self.last = time.time(), 0.0

    def update(self, n: int = 1, note: str = "") -> None:
        """Count `n` more; a line (with `note` appended) at most every `every_s` and at the end."""
        self.done += n
        now = time.time()
        if now - self.last >= self.every_s or (self.total and self.done >= self.total):
            self.last = now
            self.log.info(self.line() + (f", {note}" if note else ""))

    def line(self) -> str:
        rate = (self.done - self.start) / max(time.time() - self.t0, 1e-9)
        if self.total:
            eta = f"{(self.total - self.done) / rate:.0f}s" if rate > 0 else "?"
            return (f"{self.desc}: {self.done}/{self.total} ({100 * self.done / self.total:.0f}%)"
                    f" {rate:.0f}/s eta {eta}")
        return f"{self.desc}: {self.done} {rate:.0f}/s"

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        if not exc[0]:
            self.log.info(self.line() + " done")


def stage_logger(name: str, log_file: Path) -> logging.Logger:
    """A logger writing to the stage's log file (and to stderr when it is a terminal)."""
    logger = logging.getLogger(f"retro.stage.{name}.{id(log_file)}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.handlers.clear()
    fh = logging.FileHandler(log_file)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(fh)
    if sys.stderr.isatty():
        logger.addHandler(logging.StreamHandler())
    return logger
