"""Helpers for platform tests: write toy specs, run the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml


def toy_spec(tmp: Path, name: str = "toy", **extra) -> Path:
    """A toy-recipe spec whose store and runs live under `tmp`."""
    data = {"name": name, "recipe": {"type": "toy", "n": 10},
            "store": {"path": str(tmp / "store"), "runs": str(tmp / "runs")},
            "tracking": "none"}
    for key, value in extra.items():
        data[key] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 120
        ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "retro.cli.main", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def cli_popen(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "retro.cli.main", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def events(runs_dir: Path) -> list[dict]:
    out = []
    for run in sorted(runs_dir.iterdir()):
        f = run / "events.jsonl"
        if f.exists():
            out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def done_keys(runs_dir: Path) -> list[str]:
    """Stage keys actually computed (not cached) across every run in `runs_dir`."""
    return [e["key"] for e in events(runs_dir) if e["event"] == "done"]
