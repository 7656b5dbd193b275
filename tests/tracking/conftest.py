"""One real 2-variant toy sweep, tracked by W&B offline with an API key in the environment.

It runs `retro run` in a subprocess so that the Ray workers (which start W&B) inherit the key:
the secret test then greps everything the run wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SECRET = "wk-test-9f8e7d6c5b4a39281706f5e4d3c2b1a0"


@pytest.fixture(scope="session")
def tracked_sweep(tmp_path_factory) -> Path:
    """Run folder of a finished toy sweep (offset 0 / 7) tracked with `wandb` offline."""
    tmp = tmp_path_factory.mktemp("tracked")
    spec = tmp / "toysweep.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "toysweep", "recipe": {"type": "toy", "n": 10},
        "store": {"path": str(tmp / "store"), "runs": str(tmp / "runs")},
        "tracking": {"type": "wandb", "mode": "offline", "project": "retro-tests"},
        "sweep": {"grid": {"recipe.offset": [0, 7]}}}))
    env = {**os.environ, "WANDB_API_KEY": SECRET, "HF_TOKEN": SECRET + "-hf",
           "RAY_TMPDIR": f"/tmp/rtk{os.getpid() % 100000}"}
    proc = subprocess.run([sys.executable, "-m", "retro.cli.main", "run", str(spec)],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = (tmp / "runs").iterdir()
    return run_dir
