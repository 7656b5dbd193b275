"""A finished (or running) run's timeline from its plan.json and events.jsonl: per-stage
start→done times and the critical path of the DAG.

The critical path is the chain of stages, each an input of the next, whose start→done times
add up to the most: no amount of parallelism makes the run shorter than it, so it is where
speeding a stage up pays. A cached stage takes 0 s; a stage still running counts until now.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageTime:
    """One stage's span in the run."""

    id: str
    name: str
    state: str                      # done, cached, failed, running, pending, blocked
    seconds: float                  # started -> done (or failed / now); 0 when cached/pending
    run_seconds: float | None = None  # the stage's own compute time (manifest `seconds`)
    time_s: dict[str, float] = field(default_factory=dict)   # the manifest's split
    precision: str | None = None


def stage_times(plan: dict[str, Any], events: list[dict[str, Any]],
                now: float | None = None) -> dict[str, StageTime]:
    """Stage id -> its span, from the plan's stages and the run's events."""
    started: dict[str, float] = {}
    out = {s["id"]: StageTime(s["id"], s["name"], "cached" if s.get("cached") else "pending",
                              0.0) for s in plan["stages"]}
    for e in events:
        sid = e.get("id")
        if sid not in out:
            continue
        kind, st = e["event"], out[sid]
        if kind == "started":
            started[sid] = float(e["time"])
            st.state = "running"
        elif kind in ("done", "failed"):
            st.state = kind
            if sid in started:
                st.seconds = float(e["time"]) - started[sid]
            if kind == "done":
                summary = e.get("summary") or {}
                st.run_seconds = e.get("seconds")
                st.time_s = dict(summary.get("time_s") or {})
                st.precision = summary.get("precision")
        elif kind in ("cached", "blocked"):
            st.state, st.seconds = kind, 0.0
    now = time.time() if now is None else now
    for sid, st in out.items():
        if st.state == "running":
            st.seconds = now - started[sid]
    return out


def critical_path(plan: dict[str, Any], events: list[dict[str, Any]],
                  now: float | None = None) -> list[StageTime]:
    """The input chain with the largest sum of start→done times, first stage first.

    Args:
        plan: plan.json (stages in topological order, each with `inputs`: slot -> stage id).
        events: events.jsonl rows (`started` / `done` / `failed` / `cached` with `id`, `time`).
    """
    times = stage_times(plan, events, now)
    best: dict[str, tuple[float, str | None]] = {}      # id -> (path seconds, previous id)
    for s in plan["stages"]:                             # topological: inputs come first
        prev = max((best[i] + (i,) for i in s.get("inputs", {}).values() if i in best),
                   default=None, key=lambda t: t[0])
        base, via = (prev[0], prev[2]) if prev else (0.0, None)
        best[s["id"]] = (base + times[s["id"]].seconds, via)
    if not best:
        return []
    end = max(best, key=lambda i: best[i][0])
    chain = []
    node: str | None = end
    while node is not None:
        chain.append(times[node])
        node = best[node][1]
    return chain[::-1]


def run_span(events: list[dict[str, Any]]) -> float | None:
    """Seconds from run-started to run-finished (None while it runs or without them)."""
    t0 = next((e["time"] for e in events if e["event"] == "run-started"), None)
    t1 = next((e["time"] for e in reversed(events) if e["event"] == "run-finished"), None)
    return None if t0 is None or t1 is None else float(t1) - float(t0)
