"""Tracking protocol plumbing: build the spec's trackers for one stage execution.

Trackers are components (kind `tracker`) constructed as `cls(config, info=TrackingInfo)`. The
local JSONL mirror is not a tracker: `StageContext.log_metrics` always writes `metrics.jsonl`
into the artifact, so `retro report` needs no server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from retro.platform.registry import registry
from retro.platform.secrets import redact
from retro.platform.store import Artifact


@dataclass
class TrackingInfo:
    """Who is logging: one stage execution of a run, on behalf of one or more variants."""

    run_name: str            # the run folder name; W&B group
    run_dir: str
    stage: str               # stage name; W&B job_type
    stage_key: str
    variants: list[str]
    config: dict[str, Any] = field(default_factory=dict)   # resolved spec of the variant


class NullTracker:
    def log_config(self, config: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, artifact: Artifact, lineage: dict[str, str]) -> None: ...
    def finish(self, status: str = "success") -> None: ...


class MultiTracker:
    """Fans every call out to several trackers."""

    def __init__(self, trackers: list[Any]):
        self.trackers = trackers

    def log_config(self, config: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log_config(config)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step=step)

    def log_artifact(self, artifact: Artifact, lineage: dict[str, str]) -> None:
        for t in self.trackers:
            t.log_artifact(artifact, lineage)

    def finish(self, status: str = "success") -> None:
        for t in self.trackers:
            t.finish(status)


def build_trackers(nodes: list[dict[str, Any]], info: TrackingInfo | None) -> MultiTracker:
    trackers = []
    for node in nodes if info else []:
        entry = registry.get("tracker", node["type"])
        config = entry.node_model().model_validate(node)
        tracker = entry.obj(config, info=info)
        tracker.log_config(redact(info.config))
        trackers.append(tracker)
    return MultiTracker(trackers or [NullTracker()])
