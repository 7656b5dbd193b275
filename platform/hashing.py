"""Canonical JSON and content keys."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace: equal values always give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def content_key(stage_type: str, version: str, params: Any, input_keys: dict[str, str]) -> str:
    """Key of a stage output: stage type + version, the params it reads (data inputs as
    content digests, platform/datahash.py), its inputs' keys."""
    payload = canonical_json({"stage": stage_type, "version": version, "params": params,
                              "inputs": dict(sorted(input_keys.items()))})
    return hashlib.sha256(payload.encode()).hexdigest()[:32]

