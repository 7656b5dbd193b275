"""The index the joint trainer searches, and the immutable refreshed indexes it swaps between.

An `IndexSnapshot` is one content-addressed refresh: `root/<digest>/` with `embeddings.npy`
(float32 [n_docs, dim]), `index.faiss` and `meta.json`, written last, whose presence marks the
snapshot complete. `LiveIndex` holds one (snapshot, faiss index) pair in a single attribute; a
swap replaces that attribute in one assignment, so a search, which reads it once, runs wholly
against the old pair or wholly against the new one, never a mix and never a half-built index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retro.platform.errors import ArtifactError

EMBEDDINGS = "embeddings.npy"
INDEX = "index.faiss"
META = "meta.json"


@dataclass(frozen=True)
class IndexSnapshot:
    """One complete refreshed index (immutable once `meta.json` exists).

    Attributes:
        digest: sha256 of (document-encoder state, corpus digest, index factory, embedder
            settings): `refresh.snapshot_digest`.
        path: `root/<digest>`.
        step: training step at which the encoder snapshot was taken.
        meta: `meta.json` (n_docs, dim, factory, metric, timing: started_at / finished_at /
            seconds, shards / shards_reused, pid of the process that embedded).
    """

    digest: str
    path: Path
    step: int
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def open(cls, root: Path, digest: str) -> "IndexSnapshot":
        """The complete snapshot `root/<digest>`.

        Raises:
            ArtifactError: the folder has no `meta.json` (missing, or a refresh that never
                finished: it is not an index yet).
        """
        path = Path(root) / digest
        if not (path / META).is_file():
            raise ArtifactError(f"no complete refreshed index at {path} (no {META}); it was "
                                "never built or its refresh did not finish")
        meta = json.loads((path / META).read_text())
        return cls(digest=digest, path=path, step=int(meta.get("step", 0)), meta=meta)

    @staticmethod
    def complete(root: Path, digest: str) -> bool:
        return (Path(root) / digest / META).is_file()

    def load_index(self) -> Any:
        """The faiss index (read into memory: refreshed indexes are small and swapped often)."""
        import faiss

        return faiss.read_index(str(self.path / INDEX))

    def embeddings(self) -> np.ndarray:
        """Document embeddings float32 [n_docs, dim], memory-mapped read-only."""
        return np.load(self.path / EMBEDDINGS, mmap_mode="r")


class LiveIndex:
    """What the trainer searches; `swap` installs a new snapshot atomically.

    Thread-safe without locks: the (snapshot, index) pair lives in one attribute that `swap`
    rebinds in one assignment, and faiss indexes are only read after they are built.
    """

    def __init__(self, snapshot: IndexSnapshot):
        self._state = (snapshot, snapshot.load_index())

    @property
    def snapshot(self) -> IndexSnapshot:
        return self._state[0]

    @property
    def digest(self) -> str:
        return self._state[0].digest

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores [n, k] float32, ids [n, k] int64) of queries [n, dim]."""
        scores, ids, _ = self.search_with_snapshot(q, k)
        return scores, ids

    def search_with_snapshot(self, q: np.ndarray, k: int
                             ) -> tuple[np.ndarray, np.ndarray, IndexSnapshot]:
        """`search`, plus the snapshot that answered (for logging which index a step used)."""
        snapshot, index = self._state          # one read: the pair cannot change under us
        scores, ids = index.search(np.ascontiguousarray(q, dtype=np.float32), k)
        return scores, ids, snapshot

    def swap(self, snapshot: IndexSnapshot) -> None:
        """Install `snapshot` (loaded before the assignment, so searches never wait on IO)."""
        if not IndexSnapshot.complete(snapshot.path.parent, snapshot.digest):
            raise ArtifactError(f"refusing to swap in {snapshot.path}: it has no {META}")
        self._state = (snapshot, snapshot.load_index())

    @staticmethod
    def load(root: Path, digest: str) -> "LiveIndex":
        """Resume: the index a checkpoint last used (its digest), from the refresh root."""
        return LiveIndex(IndexSnapshot.open(root, digest))
