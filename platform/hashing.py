"""Canonical JSON and content keys."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace: equal values always give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def content_key(stage_type: str, version: str, params: Any, input_keys: dict[str, str]) -> str:
    """Key of a stage output: stage type + version, the params it reads, its inputs' keys."""
    payload = canonical_json({"stage": stage_type, "version": version, "params": params,
                              "inputs": dict(sorted(input_keys.items()))})
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of every file under a directory (relative names included)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()
