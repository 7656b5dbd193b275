"""Run folders: `<runs>/<name>-<time>/` with the resolved lock, plan, events and stage logs.

    resolved.yaml           the whole spec, every default filled, plus `lock:` (versions, git,
                            data hashes); `retro run` on it reproduces the run
    variants/<v>/resolved.yaml   one per sweep variant, sweep point applied
    plan.json, events.jsonl, status.json, logs/<stage>@<key>.log
"""

from __future__ import annotations

import json
import os
import platform as std_platform
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from retro.platform.datahash import DataHasher
from retro.platform.plan import Plan, PlannedStage
from retro.platform.secrets import restore_env_placeholders
from retro.platform.spec import LoadedSpec
from retro.platform.spec.types import data_inputs
from retro.platform.store import write_json_atomic
from retro.platform.errors import UserError

PACKAGES = ("retro", "torch", "ray", "faiss-cpu", "faiss-gpu", "transformers", "tokenizers",
            "wandb", "pydantic", "numpy", "safetensors")


@dataclass
class RunRecord:
    dir: Path

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    def event(self, kind: str, node: PlannedStage | None, extra: dict[str, Any]) -> None:
        row = {"time": time.time(), "event": kind, **extra}
        if node is not None:
            row.update(stage=node.name, id=node.id, key=node.key, variants=node.variants)
        with open(self.dir / "events.jsonl", "a") as fh:
            fh.write(json.dumps(row, default=str) + "\n")

    def set_status(self, status: str, **extra: Any) -> None:
        write_json_atomic(self.dir / "status.json", {"status": status, "time": time.time(),
                                                     **extra})

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.dir / "status.json").read_text())
        except (OSError, ValueError):
            return {"status": "unknown"}

    def lock_drift(self) -> list[str]:
        lock = yaml.safe_load((self.dir / "resolved.yaml").read_text()).get("lock") or {}
        return (lock.get("reproduces") or {}).get("drift", [])

    def events(self) -> list[dict[str, Any]]:
        path = self.dir / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def create_run(loaded: LoadedSpec, plan: Plan, argv: list[str]) -> RunRecord:
    """Make the run folder and write resolved.yaml (with lock) and plan.json before anything runs."""
    runs = Path(loaded.spec.store.runs)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = runs / f"{loaded.spec.name}-{stamp}"
    n = 1
    while run_dir.exists():
        n += 1
        run_dir = runs / f"{loaded.spec.name}-{stamp}-{n}"
    (run_dir / "logs").mkdir(parents=True)
    lock = make_lock(loaded, argv, Path(loaded.spec.store.path))
    if loaded.spec.lock:  # reproducing a run: record what changed since it was locked
        lock["reproduces"] = {"created_at": loaded.spec.lock.get("created_at"),
                              "drift": lock_drift(loaded.spec.lock, lock)}
    write_yaml(run_dir / "resolved.yaml", {**resolved(loaded.spec), "lock": lock})
    if loaded.is_sweep:
        for v in loaded.variants:
            (run_dir / "variants" / v.name).mkdir(parents=True)
            write_yaml(run_dir / "variants" / v.name / "resolved.yaml",
                       {**resolved(v.spec), "lock": {**lock, "sweep_point": v.point}})
    write_json_atomic(run_dir / "plan.json", restore_env_placeholders(plan.to_json()))
    record = RunRecord(run_dir)
    record.set_status("planned")
    return record


def resolved(spec: Any) -> dict[str, Any]:
    """The spec with every default filled; secret env values go back to `${env:NAME}`."""
    data = spec.model_dump(mode="json")
    data.pop("lock", None)
    return restore_env_placeholders(data)


def write_yaml(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    os.replace(tmp, path)


def make_lock(loaded: LoadedSpec, argv: list[str], store: Path) -> dict[str, Any]:
    """Versions, git state and content hashes of every data input."""
    return {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": restore_env_placeholders(argv),
        "python": sys.version.split()[0],
        "platform": std_platform.platform(),
        "packages": package_versions(),
        "git": git_state(),
        "data": data_hashes(loaded, store),
    }


def package_versions() -> dict[str, str]:
    out = {}
    for dist in PACKAGES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the retro checkout (where the code runs from), if it is one."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit or None, "dirty": bool(dirty.strip())} if commit else {}


def data_hashes(loaded: LoadedSpec, store: Path) -> dict[str, dict[str, Any]]:
    """Content digest of each data input (platform/datahash.py), through the store's cache:
    the same digests the stage keys hold."""
    hasher = DataHasher(store)
    out = {}
    for variant in loaded.variants:
        for item in data_inputs(variant.spec):
            digest = hasher.digest(item)
            out[item.location] = {"path": item.path, "sha256": digest.sha256,
                                  **({"package": digest.package} if digest.package else {})}
    hasher.save()
    return out


def find_runs(runs_dir: Path) -> list[RunRecord]:
    if not runs_dir.is_dir():
        return []
    return sorted((RunRecord(p) for p in runs_dir.iterdir() if (p / "plan.json").exists()),
                  key=lambda r: r.dir.stat().st_mtime)


def resolve_run(ref: str, runs_dir: Path) -> RunRecord:
    """A run by folder path, folder name, or unique name prefix."""

    p = Path(ref)
    if (p / "plan.json").exists():
        return RunRecord(p)
    matches = [r for r in find_runs(runs_dir) if r.name == ref] or \
        [r for r in find_runs(runs_dir) if r.name.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UserError(f"no run {ref!r} in {runs_dir}/ (list them with `retro ls`)")
    raise UserError(f"run {ref!r} is ambiguous: {', '.join(r.name for r in matches)}")


def lock_drift(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between the lock a run was reproduced from and the current environment."""
    notes = []
    for dist, version in (old.get("packages") or {}).items():
        now = new["packages"].get(dist)
        if now != version:
            notes.append(f"package {dist}: locked {version}, now {now or 'not installed'}")
    old_git, new_git = old.get("git") or {}, new.get("git") or {}
    if old_git.get("commit") and old_git.get("commit") != new_git.get("commit"):
        notes.append(f"git commit: locked {old_git['commit'][:12]}, now "
                     f"{(new_git.get('commit') or 'unknown')[:12]}")
    for path, entry in (old.get("data") or {}).items():
        now = (new.get("data") or {}).get(path, {})
        if entry.get("sha256") and entry.get("sha256") != now.get("sha256"):
            notes.append(f"data {path} ({entry.get('path')}): content differs from the lock")
    return notes
