"""Resumable training checkpoints, and where they live (in-process or under Ray Train).

A checkpoint directory holds:
- `model.safetensors`: the full (unsharded) model state dict;
- `optimizer.pt`: the full AdamW state, keyed by parameter name (valid for any worker count);
- `trainer_state.json`: the step reached (which is the data position and the LR schedule's
  position: both are pure functions of the step), samples/tokens seen, the seed, and the last
  metrics.

Random state needs no file: the loop reseeds torch from (seed, step, rank) at every step, so a
resumed run draws the same dropout masks as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional
import tempfile

MODEL_FILE, OPTIM_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "trainer_state.json"


def write_checkpoint(path: Path, model_state: dict, optim_state: dict,
                     state: dict[str, Any]) -> None:
    """Write one checkpoint directory (rank 0 only)."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(_untie(model_state), str(path / MODEL_FILE))
    torch.save(optim_state, path / OPTIM_FILE)
    (path / STATE_FILE).write_text(json.dumps(state, indent=2, default=float))


def read_checkpoint(path: Path) -> tuple[dict, dict, dict[str, Any]]:
    """(model state dict, optimizer state dict, trainer state) of a checkpoint directory."""
    import torch
    from safetensors.torch import load_file

    state = json.loads((path / STATE_FILE).read_text())
    return (load_file(str(path / MODEL_FILE)),
            torch.load(path / OPTIM_FILE, map_location="cpu", weights_only=True), state)


def _untie(sd: dict) -> dict:
    """safetensors refuses tensors sharing memory (tied embeddings): copy the repeats."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


class LocalRuntime:
    """Single-process runtime: checkpoints are `<root>/checkpoint_<step>` directories.

    Args:
        root: directory holding the checkpoints (a stage's work_dir survives crashes).
        keep: how many recent checkpoints to keep.
    """

    rank, world_size = 0, 1

    def __init__(self, root: Path, keep: int = 2):
        self.root, self.keep = Path(root), keep

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Optional[Path]]:
        done = sorted(self.root.glob("checkpoint_*[0-9]"))
        yield done[-1] if done else None

    def report(self, metrics: dict[str, Any], checkpoint: Optional[Path]) -> None:
        if checkpoint is None:
            return
        dest = self.root / f"checkpoint_{int(metrics['step']):09d}"
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(checkpoint, dest)   # same filesystem: the checkpoint appears whole or not at all
        for old in sorted(self.root.glob("checkpoint_*[0-9]"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def scratch(self) -> Path:
        """A fresh directory on the checkpoint filesystem to write a checkpoint into."""
        d = self.root / f".tmp-checkpoint-{os.getpid()}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d


class RayRuntime:
    """Runtime inside a Ray Train worker: checkpoints go through `ray.train.report`."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Optional[Path]]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def report(self, metrics: dict[str, Any], checkpoint: Optional[Path]) -> None:
        import ray.train

        # Every rank calls report (it synchronises); only rank 0 passes the files.
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None
        ray.train.report(metrics, checkpoint=ckpt)
        if checkpoint is not None:
            shutil.rmtree(checkpoint, ignore_errors=True)

    def scratch(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="retro-ckpt-"))
