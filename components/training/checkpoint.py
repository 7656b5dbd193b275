"""Where resumable checkpoints live (in-process or under Ray Train), and how a checkpoint
directory appears whole or not at all.

The files are `dcp.py`'s (torch.distributed.checkpoint shards + `trainer_state.json`). A
runtime gives every rank a scratch directory for a step (`scratch(step)`); once each rank has
written its part, `report(metrics, scratch)` publishes it: `LocalRuntime` renames the shared
scratch to `checkpoint_<step>` after a barrier (a crash before that leaves only a `.tmp-`
directory, which is never read), `RayRuntime` hands each rank's directory to
`ray.train.report`, which merges them into one checkpoint of the run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional
import tempfile

from retro.components.training.dcp import STATE_FILE, read_checkpoint  # noqa: F401 - API


def _barrier(world: int) -> None:
    import torch.distributed as dist

    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()


class LocalRuntime:
    """In-process runtime (one process, or each process of a torch.distributed group with
    `rank` / `world_size` set): checkpoints are `<root>/checkpoint_<step>` directories.

    Args:
        root: directory holding the checkpoints (a stage's work_dir survives crashes).
        keep: how many recent checkpoints to keep.
    """

    rank, world_size = 0, 1     # set both for a process of a multi-process group

    def __init__(self, root: Path, keep: int = 2):
        self.root, self.keep = Path(root), keep

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Optional[Path]]:
        done = sorted(self.root.glob("checkpoint_*[0-9]"))
        yield done[-1] if done else None

    def report(self, metrics: dict[str, Any], checkpoint: Optional[Path]) -> None:
        if checkpoint is None:
            return
        _barrier(self.world_size)          # every rank's shards are on disk
        if self.rank == 0:
            dest = self.root / f"checkpoint_{int(metrics['step']):09d}"
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(checkpoint, dest)   # same filesystem: appears whole or not at all
            for old in sorted(self.root.glob("checkpoint_*[0-9]"))[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier(self.world_size)

    def scratch(self, step: int) -> Path:
        """The directory every rank writes the step's checkpoint into (rank 0 empties it)."""
        d = self.root / f".tmp-checkpoint_{int(step):09d}"
        if self.rank == 0:
            for stale in self.root.glob(".tmp-checkpoint*"):   # a crashed attempt's
                shutil.rmtree(stale, ignore_errors=True)
            d.mkdir(parents=True)
        _barrier(self.world_size)
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

        # Every rank reports its own shards (distinct file names); Ray merges them into one
        # checkpoint directory of the run, registered once every rank has uploaded.
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None
        ray.train.report(metrics, checkpoint=ckpt)
        if checkpoint is not None:
            shutil.rmtree(checkpoint, ignore_errors=True)

    def scratch(self, step: int) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"retro-ckpt-{int(step)}-"))
