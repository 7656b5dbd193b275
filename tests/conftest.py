"""Shared test setup: quiet offline environment, the toy plugin on the path, one local Ray."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"
SHARED_DATA = Path(os.environ.get("RETRO_DATA", ROOT.parent / "shared" / "data"))

_TMP = Path(tempfile.mkdtemp(prefix="retro-tests-"))
# Set before anything imports ray/wandb/transformers; Ray workers inherit this environment.
os.environ.update({
    "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", f"/tmp/rt{os.getpid() % 100000}"),
    "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(_TMP / "wandb"),
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    "RETRO_DATA": str(SHARED_DATA),
})
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("RAY_ADDRESS", None)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(PLUGINS), os.environ.get("PYTHONPATH", "")) if p)
if str(PLUGINS) not in sys.path:
    sys.path.insert(0, str(PLUGINS))


@pytest.fixture(scope="session")
def ray_session():
    """One embedded local Ray for every in-process test that needs it."""
    from retro.platform.scheduler import connect_ray

    import ray

    started = connect_ray(num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
