"""The W&B tracker (the default): one W&B run per stage execution.

Layout (why: docs/tracking.md): stages run in separate Ray worker processes and one stage may
serve several sweep variants, so a W&B run cannot stay open across a whole variant. Each stage
execution is its own W&B run with `group` = the retro run folder name (one group per sweep or
run), `job_type` = the stage name, `tags` = the variants it serves, `config` = the resolved spec
of the variant plus a `retro` block (stage, key, variants, inputs). Stage outputs are logged as
W&B reference artifacts named `<stage>-<key[:16]>` pointing at the store directory, with their
input keys in the metadata (and, online, `use_artifact` edges), so the DB -> index ->
neighbours -> checkpoint chain is visible.

Mode: `auto` picks WANDB_MODE if set, else `online` when an API key is configured (WANDB_API_KEY
or a `wandb login` entry in ~/.netrc), else `offline`. The key is read by wandb itself from the
environment; it never enters the spec, so it never reaches resolved.yaml or manifests.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal, Optional

from retro.platform.registry import StrictModel, register
import netrc
from retro.platform.secrets import redact

log = logging.getLogger("retro.tracking.wandb")

_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
              "disabled": "disabled"}


def resolve_mode(mode: str, env: dict[str, str] | None = None) -> str:
    """The W&B mode to use: the spec's choice, else WANDB_MODE, else online iff a key exists.

    Args:
        mode: `auto`, `online`, `offline` or `disabled` (the tracker config's `mode`).
        env: environment to read (default `os.environ`).

    Returns:
        `online`, `offline` or `disabled`.
    """
    env = os.environ if env is None else env
    if mode != "auto":
        return mode
    if env.get("WANDB_MODE", "").lower() in _ENV_MODES:
        return _ENV_MODES[env["WANDB_MODE"].lower()]
    if env.get("WANDB_DISABLED", "").lower() in ("1", "true"):
        return "disabled"
    return "online" if env.get("WANDB_API_KEY") or _netrc_has_key(env) else "offline"


def _netrc_has_key(env: dict[str, str]) -> bool:
    host = env.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(env.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def artifact_name(stage: str, key: str) -> str:
    """W&B artifact name of a store artifact: `<stage>-<key[:16]>`."""
    return f"{stage}-{key[:16]}"


@register("tracker", "wandb", default=True)
class WandbTracker:
    """Weights & Biases: one W&B run per stage execution, grouped by run; offline without a key."""

    class Config(StrictModel):
        project: str = "retro"
        """W&B project."""
        entity: Optional[str] = None
        """W&B entity (team or user); None uses the account default."""
        mode: Literal["auto", "online", "offline", "disabled"] = "auto"
        """`auto`: WANDB_MODE if set, else `online` when an API key is configured, else
        `offline` (sync later with `wandb sync <run folder>/wandb/offline-run-*`)."""
        dir: Optional[str] = None
        """Folder that receives the `wandb/` directory; None puts it in the run folder."""
        tags: list[str] = []
        """Extra tags on every W&B run (the variant names are always added)."""
        log_artifacts: bool = True
        """Log stage outputs as W&B reference artifacts (file:// store paths, not uploaded)."""

    def __init__(self, config: Config, *, info: Any) -> None:
        self.config, self.info, self.run = config, info, None
        self.mode = resolve_mode(config.mode)
        if self.mode == "disabled":
            return
        try:
            self.run = self._init()
        except Exception as e:  # noqa: BLE001 - tracking must never fail the science
            log.warning("W&B init failed (%s: %s); this stage is not tracked in W&B",
                        type(e).__name__, e)

    def _init(self) -> Any:
        import wandb

        info = self.info
        root = Path(self.config.dir or info.run_dir)
        root.mkdir(parents=True, exist_ok=True)
        who = info.variants[0] if len(info.variants) == 1 else "shared"
        run = wandb.init(
            project=self.config.project, entity=self.config.entity, mode=self.mode,
            dir=str(root), group=info.run_name, job_type=info.stage,
            name=f"{who}/{info.stage}", tags=[*info.variants, *self.config.tags][:64],
            config={"retro": {"run": info.run_name, "stage": info.stage,
                              "stage_key": info.stage_key, "variants": list(info.variants)}},
            reinit="create_new",
            settings=wandb.Settings(console="off", x_disable_stats=True, disable_git=True,
                                    save_code=False, x_save_requirements=False, silent=True,
                                    disable_job_creation=True))
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        return run

    def log_config(self, config: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run is None or not metrics:
            return
        summary = {k.removeprefix("summary/"): v for k, v in metrics.items()
                   if k.startswith("summary/")}
        if summary:
            self.run.summary.update(summary)
        rest = {k: v for k, v in metrics.items() if not k.startswith("summary/")}
        if rest:
            self.run.log({**rest, **({"step": step} if step is not None else {})})

    def log_artifact(self, artifact: Any, lineage: dict[str, str]) -> None:
        """Log `artifact` (a store Artifact) with its inputs `lineage` (slot -> "stage/key")."""
        if self.run is None or not self.config.log_artifacts:
            return

        try:
            manifest = artifact.manifest
            meta = {"stage": artifact.stage, "key": artifact.key, "path": str(artifact.path),
                    "inputs": lineage, "params": redact(manifest.get("params", {})),
                    "summary": manifest.get("summary", {})}
            self.run.config.update({"retro": {**self.run.config["retro"], "inputs": lineage}},
                                   allow_val_change=True)
            if self.mode == "online":  # offline runs cannot record use; metadata keeps lineage
                store = Path(artifact.path).parent.parent
                for ref in lineage.values():
                    stage, key = ref.split("/", 1)
                    self.run.use_artifact(_reference(stage, key, store / stage / key, {}))
            self.run.log_artifact(_reference(artifact.stage, artifact.key, artifact.path, meta))
        except Exception as e:  # noqa: BLE001
            log.warning("W&B artifact logging failed (%s: %s)", type(e).__name__, e)

    def finish(self, status: str = "success") -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if status == "success" else 1)
            self.run = None


def _reference(stage: str, key: str, path: Path, metadata: dict[str, Any]) -> Any:
    """A W&B artifact referencing a store directory (not uploaded; same digest everywhere)."""
    import wandb

    art = wandb.Artifact(artifact_name(stage, key), type=stage, metadata=metadata)
    art.add_reference(f"file://{Path(path).absolute()}", name="payload", checksum=False)
    return art
