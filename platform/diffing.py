"""Differences between the resolved fields of two specs or runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from retro.platform.api import spec_path
from retro.platform.runs import resolved
from retro.platform.spec import load_spec


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists keep their indexes."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out or ({prefix[:-1]: {}} if prefix else {})
    if isinstance(data, list) and data and any(isinstance(v, (dict, list)) for v in data):
        out = {}
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: data}


def resolved_dict(ref: str | Path) -> dict[str, Any]:
    loaded = load_spec(spec_path(ref))
    return resolved(loaded.spec)


def diff_specs(a: str | Path, b: str | Path) -> list[tuple[str, Any, Any]]:
    """(dotted path, value in a, value in b) for every differing resolved field."""
    fa, fb = flatten(resolved_dict(a)), flatten(resolved_dict(b))
    missing = "<absent>"
    return [(k, fa.get(k, missing), fb.get(k, missing))
            for k in sorted(set(fa) | set(fb)) if fa.get(k, missing) != fb.get(k, missing)]
