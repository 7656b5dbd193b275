"""What the CLI calls: validate, plan, run. Each is a few lines over the platform modules."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from retro.platform.errors import UserError
from retro.platform.plan import Plan, build_plan, force_rerun
from retro.platform.runs import RunRecord, create_run, resolved
from retro.platform.scheduler import RunOutcome, connect_ray, run_plan
from retro.platform.spec import LoadedSpec, load_spec
from retro.platform.store import ArtifactStore
import os


def spec_path(ref: str | Path) -> Path:
    """A spec file, or a run folder (meaning its resolved.yaml)."""
    p = Path(ref)
    return p / "resolved.yaml" if p.is_dir() and (p / "resolved.yaml").exists() else p


def validate(ref: str | Path, overrides: Iterable[str] = ()) -> tuple[LoadedSpec, Plan]:
    """Parse + validate + plan (without touching the store). Raises SpecError."""
    loaded = load_spec(spec_path(ref), overrides)
    return loaded, build_plan(loaded)


def plan(ref: str | Path, overrides: Iterable[str] = ()) -> tuple[LoadedSpec, Plan]:
    loaded = load_spec(spec_path(ref), overrides)
    return loaded, build_plan(loaded, ArtifactStore(loaded.spec.store.path), with_info=True)


def run(ref: str | Path, overrides: Iterable[str] = (), argv: list[str] | None = None,
        on_event: Callable | None = None, rerun: Iterable[str] = ()
        ) -> tuple[RunRecord, RunOutcome, Plan]:
    """Validate, plan, record the run folder, then execute on Ray. Nothing is written if the
    spec is invalid or data inputs are missing. `rerun` names stages to recompute anyway."""
    loaded = load_spec(spec_path(ref), overrides)
    store = ArtifactStore(loaded.spec.store.path)
    the_plan = build_plan(loaded, store)
    force_rerun(the_plan, list(rerun))
    if the_plan.missing_data:
        raise UserError("missing data inputs:\n" + "\n".join(
            f"  - {p}: {v} does not exist" for p, v in the_plan.missing_data)
            + "\n    hint: fix the paths or set the environment variables the spec uses")
    record = create_run(loaded, the_plan, argv or [])
    record.event("run-started", None, {"to_run": len(the_plan.to_run)})

    def sink(kind, node, extra):
        record.event(kind, node, extra)
        if on_event:
            on_event(kind, node, extra)

    started = False
    record.set_status("running")
    try:
        if the_plan.to_run:  # an all-cached run needs no Ray at all
            started = connect_ray(loaded.spec.resources.ray_address,
                                  loaded.spec.resources.num_cpus)
        outcome = run_plan(
            the_plan, store.root, record.log_dir, run_name=record.name,
            tracking={v.name: [t.model_dump(mode="json") for t in v.spec.tracking]
                      for v in loaded.variants},
            configs={v.name: resolved(v.spec) for v in loaded.variants},
            on_event=sink, max_concurrent=loaded.spec.resources.max_concurrent_stages,
            check_store=_joined_cluster(loaded.spec.resources.ray_address, started))
    except BaseException:
        record.set_status("interrupted")
        raise
    finally:
        if started:
            import ray

            ray.shutdown()
    record.set_status("done" if outcome.ok else "failed",
                      failures=[str(f) for f in outcome.failures])
    record.event("run-finished", None, {"ok": outcome.ok})
    return record, outcome, the_plan


def _joined_cluster(address: str | None, started: bool) -> bool:
    """Whether stages may land on other nodes: we joined an address, or found Ray already
    connected (unknown, so check). An embedded Ray this process started has only this node."""

    return bool(address or os.environ.get("RAY_ADDRESS")) or not started
