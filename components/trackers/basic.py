"""Trackers that need no service: `none` (the JSONL mirror only) and `stdout`.

The default tracker is `wandb` (components/trackers/wandb_tracker.py).
"""

from __future__ import annotations

from typing import Any

from retro.platform.registry import StrictModel, register


@register("tracker", "none")
class NoTracker:
    """Logs nowhere but the local JSONL mirror every stage writes anyway."""

    class Config(StrictModel):
        pass

    def __init__(self, config: Config, *, info: Any) -> None:
        self.config = config

    def log_config(self, config: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, artifact: Any, lineage: dict[str, str]) -> None: ...
    def finish(self, status: str = "success") -> None: ...


@register("tracker", "stdout")
class StdoutTracker:
    """Prints metrics to the stage log's stream (stdout of the stage task)."""

    class Config(StrictModel):
        every: int = 1
        """Print every n-th metrics call."""

    def __init__(self, config: Config, *, info: Any) -> None:
        self.config, self.info, self.calls = config, info, 0

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls += 1
        if self.calls % self.config.every == 0:
            print(f"[{self.info.stage}] step {step}: {metrics}", flush=True)

    def log_artifact(self, artifact: Any, lineage: dict[str, str]) -> None:
        print(f"[{self.info.stage}] artifact {artifact.stage}/{artifact.key}", flush=True)

    def finish(self, status: str = "success") -> None: ...
