"""Content-addressed artifact store: `<root>/<stage>/<key>/` holding a payload and manifest.json.

Invariants:
- A key directory that exists is complete: payloads are written under `<root>/<stage>/.tmp/`
  and renamed into place in one `os.rename` after the manifest is written.
- One process computes a key at a time: `lock(stage, key)` is an exclusive `flock` on
  `<root>/.locks/<stage>.<key>.lock`, released by the kernel if its holder dies.
- Resumable work in progress (training checkpoints) lives in `<root>/<stage>/.work/<key>/` and
  survives crashes; it is deleted once the artifact is committed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from retro.platform.errors import ArtifactError
import numpy as np

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Artifact:
    """A committed stage output, read-only by convention."""

    stage: str
    key: str
    path: Path

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / MANIFEST).read_text())

    def file(self, name: str) -> Path:
        p = self.path / name
        if not p.exists():
            raise ArtifactError(f"artifact {self.stage}/{self.key[:12]} has no file {name!r} "
                                f"({self.path}); the stage version may have changed: re-run")
        return p


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()

    # -------------------------------------------------------------------------- lookups
    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def exists(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / MANIFEST).is_file()

    def get(self, stage: str, key: str) -> Artifact:
        if not self.exists(stage, key):
            raise ArtifactError(f"no artifact {stage}/{key[:12]} in {self.root}")
        return Artifact(stage, key, self.path(stage, key))

    def work_path(self, stage: str, key: str) -> Path:
        """Where `work_dir` is (not created): readers look there for an unfinished stage."""
        return self.root / stage / ".work" / key

    def work_dir(self, stage: str, key: str) -> Path:
        """Scratch space that survives an interrupted attempt (checkpoints for resume)."""
        d = self.work_path(stage, key)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def all_artifacts(self) -> Iterator[Artifact]:
        if not self.root.is_dir():
            return
        for stage_dir in sorted(p for p in self.root.iterdir()
                                if p.is_dir() and not p.name.startswith(".")):
            for key_dir in sorted(p for p in stage_dir.iterdir() if not p.name.startswith(".")):
                if (key_dir / MANIFEST).is_file():
                    yield Artifact(stage_dir.name, key_dir.name, key_dir)

    # -------------------------------------------------------------------------- writing
    @contextlib.contextmanager
    def lock(self, stage: str, key: str, blocking: bool = True) -> Iterator[bool]:
        """Exclusive per-key lock; yields False if non-blocking and someone else holds it."""
        lock_dir = self.root / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{stage}.{key}.lock", "a+") as fh:
            flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
            try:
                fcntl.flock(fh, flags)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def new_tmp(self, stage: str, key: str) -> Path:
        d = self.root / stage / ".tmp" / f"{key}-{uuid.uuid4().hex[:8]}"
        d.mkdir(parents=True)
        return d

    def commit(self, tmp: Path, stage: str, key: str, manifest: dict[str, Any],
               replace: bool = False) -> Artifact:
        """Write the manifest into `tmp`, then rename it to its key directory (atomic).

        With `replace` (a forced rerun) an existing key directory is first moved aside, so
        readers see the old complete artifact, briefly none, then the new complete one.
        """
        manifest = {**manifest, "stage": stage, "key": key, "committed_at": time.time(),
                    "files": _file_sizes(tmp)}
        write_json_atomic(tmp / MANIFEST, manifest)
        dest = self.path(stage, key)
        if replace and dest.exists():
            trash = self.root / stage / ".tmp" / f"{key}-replaced-{uuid.uuid4().hex[:8]}"
            os.rename(dest, trash)
            shutil.rmtree(trash, ignore_errors=True)
        if dest.exists():  # someone committed the same key; identical by construction
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.rename(tmp, dest)
            _fsync_dir(dest.parent)
        shutil.rmtree(self.root / stage / ".work" / key, ignore_errors=True)
        return Artifact(stage, key, dest)

    # -------------------------------------------------------------------------- gc
    def garbage(self, referenced: set[tuple[str, str]]) -> list[Path]:
        """Artifacts no run references, plus leftovers of interrupted writes."""
        out = [a.path for a in self.all_artifacts() if (a.stage, a.key) not in referenced]
        if self.root.is_dir():
            for stage_dir in self.root.iterdir():
                if stage_dir.is_dir() and not stage_dir.name.startswith("."):
                    out += sorted((stage_dir / ".tmp").glob("*"))
        return out


def _file_sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size
            for p in sorted(root.rglob("*")) if p.is_file()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` via a temp file + rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def open_memmap(path: str | Path, dtype: Any = None, shape: tuple | None = None,
                mode: str = "r"):
    """Open (mode r/r+) or create (mode w+, needs dtype and shape) a .npy memmap."""

    if mode == "w+":
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    return np.load(path, mmap_mode=mode)
