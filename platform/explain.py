"""`retro plan --explain STAGE`: why a stage is not cached (the question DVC's `status` answers).

A key hashes four components: the stage version, its params (data inputs as content digests),
its input artifacts' keys and nothing else. Every manifest records them, so the planned stage
is compared with the most recent artifact of the same stage name in the store and each changed
component is named: `params.pretrain.fit.lr: 0.0005 -> 0.002`, `data corpus.paths.0: sha256
9b2de21a.. -> 04c1e2f7..`, `version 1 -> 2`, `input tokens: key 8120f0ea.. -> 1c9e7a31..`. A changed
input is explained in turn, down to the stage whose own component changed.
"""

from __future__ import annotations

import json
import time
from typing import Any

from retro.platform.errors import UserError
from retro.platform.plan import Plan, PlannedStage
from retro.platform.registry import close_matches
from retro.platform.secrets import restore_env_placeholders
from retro.platform.store import MANIFEST, ArtifactStore


def explain(plan: Plan, store: ArtifactStore, name: str) -> list[dict[str, Any]]:
    """One explanation per planned stage called `name` (several in a sweep).

    Raises:
        UserError: no stage of that name in the plan.
    """
    nodes = [s for s in plan.stages if s.name == name]
    if not nodes:
        known = sorted({s.name for s in plan.stages})
        close = close_matches(name, known)
        raise UserError(f"--explain {name!r}: no stage of this name in the plan"
                        + (f"; did you mean {close[0]!r}?" if close else "")
                        + f" Stages: {', '.join(known)}")
    return [_explain(plan, store, node, set()) for node in nodes]


def _explain(plan: Plan, store: ArtifactStore, node: PlannedStage, seen: set[str]
             ) -> dict[str, Any]:
    seen.add(node.id)
    out: dict[str, Any] = {"id": node.id, "stage": node.stage, "key": node.key,
                           "cached": node.cached, "previous": None, "changes": [],
                           "upstream": []}
    if node.cached:
        return out
    previous = last_manifest(store, node)
    if previous is None:
        out["changes"] = [f"no {node.name!r} artifact (stage {node.stage}) in {store.root}: "
                          "it never ran against this store"]
        return out
    out["previous"] = {"key": previous["key"], "committed_at": previous.get("committed_at")}
    changes = _version(node, previous) + _params(node, previous) + _data(node, previous)
    for slot, stage_id in sorted(node.inputs.items()):
        upstream = plan.by_id(stage_id)
        old = ((previous.get("inputs") or {}).get(slot) or {}).get("key")
        if old != upstream.key:
            changes.append(f"input {slot}: key {_short(old)} -> {_short(upstream.key)}")
            if stage_id not in seen and not upstream.cached:
                out["upstream"].append(_explain(plan, store, upstream, seen))
    for slot in sorted(set(previous.get("inputs") or {}) - set(node.inputs)):
        changes.append(f"input {slot}: no longer used")
    if not changes:
        changes.append("no recorded component differs: the artifact was keyed by an older "
                       "key formula (content keys for data, see README); it recomputes once")
    out["changes"] = changes
    return out


def last_manifest(store: ArtifactStore, node: PlannedStage) -> dict[str, Any] | None:
    """The manifest of the most recently committed artifact of `node`'s stage and name."""
    stage_dir = store.root / node.stage
    best = None
    if not stage_dir.is_dir():
        return None
    for key_dir in stage_dir.iterdir():
        if key_dir.name.startswith("."):
            continue
        try:
            manifest = json.loads((key_dir / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        if manifest.get("name") == node.name and (
                best is None or manifest.get("committed_at", 0) > best.get("committed_at", 0)):
            best = manifest
    return best


def _version(node: PlannedStage, previous: dict[str, Any]) -> list[str]:
    old = previous.get("version")
    return [] if str(old) == str(node.version) else [f"version {old} -> {node.version}"]


def _params(node: PlannedStage, previous: dict[str, Any]) -> list[str]:
    """Changed param leaves, leaving out data paths (their content is compared instead)."""
    data_params = {d.param for d in node.data.values()} | {
        d.get("param") for d in (previous.get("data") or {}).values()}
    now = _leaves(restore_env_placeholders(node.params))
    was = _leaves(previous.get("params") or {})
    out = []
    for path in sorted(set(now) | set(was)):
        if any(path == p or path.startswith(f"{p}.") for p in data_params if p):
            continue
        if now.get(path, _ABSENT) != was.get(path, _ABSENT):
            out.append(f"params.{path}: {_fmt(was.get(path, _ABSENT))} -> "
                       f"{_fmt(now.get(path, _ABSENT))}")
    return out


def _data(node: PlannedStage, previous: dict[str, Any]) -> list[str]:
    if "data" not in previous:
        return [f"data {loc}: not recorded by the previous artifact (keyed by path, before "
                "content keys)" for loc in sorted(node.data)] if node.data else []
    was, out = previous["data"], []
    for loc in sorted(set(node.data) | set(was)):
        new, old = node.data.get(loc), was.get(loc)
        if new is None:
            out.append(f"data {loc}: no longer read")
        elif old is None:
            out.append(f"data {loc}: newly read ({_digest(new.record())})")
        elif (old.get("sha256"), old.get("package")) != (new.sha256, new.package):
            after = _digest(new.record())
            if old.get("sha256") and new.sha256 and not (old.get("package") or new.package):
                after = _short(new.sha256)  # `sha256 ab12.. -> cd34..`
            out.append(f"data {loc}: {_digest(old)} -> {after}")
    return out


def _digest(record: dict[str, Any]) -> str:
    sha = record.get("sha256")
    text = f"sha256 {_short(sha)}" if sha else f"missing ({record.get('path')})"
    pkg = record.get("package")
    return f"{pkg['name']} {pkg['version']} {text}" if pkg else text


_ABSENT = object()


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, v in enumerate(value):
            out.update(_leaves(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: value} if prefix else {}


def _fmt(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, default=str)


def _short(key: str | None) -> str:
    return f"{key[:8]}.." if key else "(none)"


def committed(manifest_time: float | None) -> str:
    """`2026-12-01 09:10` for a manifest's committed_at."""
    if not manifest_time:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(manifest_time))
