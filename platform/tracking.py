"""Tracking protocol plumbing: build the spec's trackers for one stage execution.

Trackers are components (kind `tracker`) constructed as `cls(config, info=TrackingInfo)`. The
local JSONL mirror is not a tracker: `StageContext.log_metrics` always writes `metrics.jsonl`
into the artifact, so `retro report` needs no server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from retro.platform.registry import registry
from retro.platform.store import Artifact

# Names that END in a secret word (HF_TOKEN, wandb_api_key, AWS_SECRET_ACCESS_KEY), so that
# `tokenizer` or `max_tokens` are not mistaken for secrets.
_SECRET_KEY = re.compile(r"(^|[_-])(api[_-]?key|access[_-]?key|secret[_-]?key|token|secret|"
                         r"password|passwd|credentials?)$", re.I)


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


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """Hide secrets before anything is logged: values under secret-looking keys (api_key,
    token, ...) and any occurrence of a secret environment variable's value (WANDB_API_KEY,
    HF_TOKEN, ...: e.g. interpolated into a spec string with `${env:...}`)."""
    secrets = env_secrets() if secrets is None else secrets
    if isinstance(value, dict):
        return {k: ("<redacted>" if _SECRET_KEY.search(str(k)) else redact(v, secrets))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "<redacted>")
    return value


def env_secrets() -> list[str]:
    """Values of environment variables whose names look secret (8+ characters, longest first)."""
    import os

    return sorted({v for k, v in os.environ.items() if _SECRET_KEY.search(k) and len(v) >= 8},
                  key=len, reverse=True)
