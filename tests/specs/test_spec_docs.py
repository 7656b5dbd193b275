"""docs/spec.md is generated from the schema and must be current."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_spec_reference_is_current():
    # Without the test-only toy plugin on the path: the docs cover shipped components only.
    env = {**os.environ, "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, "-m", "retro.cli.main", "docs"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "recipe: toy" not in res.stdout
    current = (ROOT / "docs" / "spec.md").read_text()
    assert res.stdout == current, "docs/spec.md is stale: run `retro docs > docs/spec.md`"
    for kind in ("corpus", "retriever", "model", "trainer", "instruct", "evaluator", "tracker"):
        assert f"## Components: {kind}" in current
