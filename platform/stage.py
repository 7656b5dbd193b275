"""The stage contract: what a stage declares, what a recipe asks for, what a stage receives.

A stage is a function declared with its typed params and its named input slots:

    class ChunkDbParams(StageParams):
        chunk_length: int

    @stage("chunk-db", version="2", params=ChunkDbParams,
           inputs={"tokens": "tokenized documents (tokenize)"})
    def chunk_db(ctx: StageContext[ChunkDbParams]) -> dict | None:
        tokens = ctx.inputs["tokens"]            # an Artifact
        n = ctx.params.chunk_length              # the validated params model
        ...write files into ctx.out_dir...
        return {"n_chunks": n}                   # summary metrics for the manifest

A recipe asks for it with `StageCall("chunk-db", "chunk-db", reads={"chunk_length":
"retriever.chunk_length"}, inputs={"tokens": tokenize_call})`: inputs are the handles (the
`StageCall`s) of the producing calls. The planner checks every call against the declaration
(unknown or missing slots and params are spec errors naming recipe, stage and slot), validates
the read values into the params model, and keys the stage by exactly that model's dump.

It is pure: its output depends only on `ctx.params`, its input artifacts and its version, which
is exactly what its content key hashes. It never reads the cwd or global paths and never imports
the scheduler; it parallelises through `ctx.parallel_map`. Execution settings (workers,
failures, checkpoint cadence, sharding) come in `ctx.resources` and never enter the key.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Protocol, TypeVar

from pydantic import BaseModel

from retro.platform.errors import SpecIssue
from retro.platform.registry import StrictModel, register, registry
from retro.platform.spec.model import ResourceRequest
from retro.platform.store import Artifact
from retro.platform.timing import Timings, merge


class StageParams(StrictModel):
    """Base of every stage's params model: exactly the values its key covers."""


class NoParams(StageParams):
    """A stage that reads no spec value."""


@dataclass(frozen=True)
class Slot:
    """A named input of a stage: the artifact of another call."""

    doc: str = ""
    optional: bool = False


P = TypeVar("P", bound=BaseModel)


class StageDef(Generic[P]):
    """A declared stage: its function, version, params model, input slots and plan hooks.

    Calling it calls the function, so `tokenize(ctx)` works in tests (JSON params in
    `ctx.params` are validated into the params model first).
    """

    def __init__(self, name: str, fn: Callable[["StageContext"], Any], version: str,
                 params: type[P], inputs: dict[str, Slot], distributed: bool,
                 estimate: Callable[[P], dict[str, Any]] | None) -> None:
        self.name, self.fn, self.version, self.params = name, fn, version, params
        self.inputs, self.distributed, self._estimate = inputs, distributed, estimate
        self.__doc__, self.__module__ = fn.__doc__, fn.__module__
        self.__name__ = getattr(fn, "__name__", name)

    def __call__(self, ctx: "StageContext") -> Any:
        if isinstance(ctx.params, dict):    # a direct call (tests, tools) with JSON params
            from retro.platform.registry import registry

            registry.load_plugins()             # the nodes' component types
            ctx.params = self.params.model_validate(ctx.params)
        return self.fn(ctx)

    def estimate(self, params: P) -> dict[str, Any]:
        """`retro plan`'s info for this stage (empty unless the stage declared a hook)."""
        return dict(self._estimate(params) or {}) if self._estimate else {}

    @property
    def required(self) -> list[str]:
        return [s for s, slot in self.inputs.items() if not slot.optional]


def stage(name: str, *, version: str, params: type[BaseModel] = NoParams,
          inputs: dict[str, str | Slot] | None = None, distributed: bool = False,
          estimate: Callable[[Any], dict[str, Any]] | None = None) -> Callable[[Any], StageDef]:
    """Declare and register a stage.

    Args:
        name: the stage type recipes name in `StageCall.stage`.
        version: part of the content key; bump it when the outputs change.
        params: the pydantic model of its params; `ctx.params` is an instance of it.
        inputs: slot -> description (`str`, required) or `Slot(doc, optional=True)`.
        distributed: the stage spreads its own work (shards or Ray Train workers), so its
            launching task reserves no CPU itself.
        estimate: `params -> {label: value}` for `retro plan`'s info column.
    """
    slots = {k: v if isinstance(v, Slot) else Slot(v) for k, v in (inputs or {}).items()}

    def deco(fn: Callable[["StageContext"], Any]) -> StageDef:
        d = StageDef(name, fn, version, params, slots, distributed, estimate)
        register("stage", name, version=version)(d)
        return d

    return deco


@dataclass(frozen=True)
class Pick:
    """A read of only some fields of a spec mapping (a component node keeps its `type`): the
    positive list of what one call depends on, e.g. `Pick("eval.0", ("split", "batch_size"))`.
    The other fields take their defaults when the stage's params model validates the value."""

    path: str
    fields: tuple[str, ...]


@dataclass(eq=False)
class StageCall:
    """One node a recipe asks for, before keys are computed; also the handle other calls pass
    as an input.

    Attributes:
        name: node name, unique within a variant (`embed`, `retro-fit`, `eval-ppl-gate0`);
            also the key into `resources.stages`.
        stage: registered stage type that computes it.
        reads: param name -> dotted spec path, or a `Pick` of some fields there. These values
            (validated into the stage's params model, which keeps only the fields it declares)
            reach the stage and its key.
        consts: recipe-chosen constant params (also part of the key).
        inputs: input slot -> the `StageCall` producing it (a handle).
    """

    name: str
    stage: str
    reads: dict[str, "str | Pick"] = field(default_factory=dict)
    consts: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, "StageCall"] = field(default_factory=dict)


def typed_params(stage_type: str, values: dict[str, Any]) -> BaseModel:
    """`values` validated into the params model of stage `stage_type` (tests, tools)."""

    registry.load_plugins()
    return registry.get("stage", stage_type).obj.params.model_validate(values)


class Recipe(Protocol):
    """Turns a validated spec into the stage calls of one experiment (kind `recipe`).

    Subclass `BaseRecipe` for the optional hooks' defaults."""

    def check(self, spec: Any) -> list[SpecIssue]:
        """Cross-field problems of `spec` this recipe cannot run with."""

    def stages(self, spec: Any) -> list[StageCall]:
        """The calls, in any order; inputs are other calls of the list."""

    def estimate(self, spec: Any, name: str, params: Any) -> dict[str, Any]:
        """Extra `retro plan` info for call `name` (e.g. parameters and cost of training)."""

    def resolve(self, spec: Any) -> Any:
        """`spec` with every value the run will use written out (defaults that depend on other
        sections: preset schedules, layouts, neighbour counts). Idempotent; the planner keys
        the resolved spec and resolved.yaml records it, so the lock is the truth."""


class BaseRecipe:
    """Defaults of the optional `Recipe` hooks; a recipe's `Config` arrives as `self.config`."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def check(self, spec: Any) -> list[SpecIssue]:
        return []

    def estimate(self, spec: Any, name: str, params: Any) -> dict[str, Any]:
        return {}

    def resolve(self, spec: Any) -> Any:
        return spec


class Tracker(Protocol):
    """Where a stage's configs, metrics and artifacts go (W&B, JSONL, stdout, ...)."""

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, artifact: Artifact, lineage: dict[str, str]) -> None: ...

    def finish(self, status: str = "success") -> None: ...


ParallelMap = Callable[[Callable[[Any], Any], list, ResourceRequest], list]


@dataclass
class StageContext(Generic[P]):
    """Everything a stage may use. Built by the platform, one per execution."""

    name: str
    stage: str
    key: str
    params: P
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

        return Timings(self.summary.setdefault("time_s", {}))(name)

    def add_times(self, seconds: dict[str, float] | None) -> None:
        """Add time measured elsewhere (a shard's or worker's `Timings.as_dict()`)."""

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
