"""Asynchronous index refresh (REALM / Atlas): a Ray actor re-embeds the corpus with a snapshot
of the document encoder while training continues against the stale index.

Each refresh is a content-addressed artifact `root/<digest>/`, the digest hashing the encoder
snapshot's tensors, the corpus digest, the index factory and the embedding settings, so the
same snapshot is never embedded twice. Inside it the corpus is embedded in shards, each written
atomically (`shard-<a>-<b>.npy`, temp file + rename); then `embeddings.npy`, `index.faiss` and,
last, `meta.json` (its presence = complete; `live_index.IndexSnapshot`). A refresh that dies
mid-way (the actor or the whole process killed) leaves its finished shards behind; the next
refresh of the same digest, by a restarted actor or a new process, reuses them.

The actor is a `ray.remote` class on the existing Ray connection (a stage runs inside a Ray
worker; `ray.is_initialized()`); without Ray (`backend="thread"`, unit tests) the same worker runs
in a background thread. It asks for `actor_cpus` logical CPUs (default 0: a trainer stage that
holds every CPU must not deadlock waiting for its own refresher) and runs `threads` torch threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np

from retro.components.joint.live_index import EMBEDDINGS, INDEX, META, IndexSnapshot
from retro.platform.errors import RetroError, UserError
from retro.platform.store import write_json_atomic

Backend = Literal["auto", "ray", "thread"]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class RefreshFailed(RetroError):
    """A refresh did not produce an index (after its retries)."""


class _InjectedCrash(RuntimeError):
    """Fault injection in the thread backend (the Ray backend exits the actor process)."""


def snapshot_digest(doc_encoder_state: dict[str, Any], corpus_digest: str, factory: str,
                    settings: str = "") -> str:
    """sha256 of the document encoder's tensors (names, dtypes, shapes, bytes), the corpus
    digest, the faiss factory and `settings` (anything else that changes the embeddings: pooling,
    max_length, precision, metric)."""
    h = hashlib.sha256()
    for part in (corpus_digest, factory, settings):
        h.update(part.encode() + b"\0")
    for name in sorted(doc_encoder_state):
        t = doc_encoder_state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\0".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _tensor_bytes(t: Any) -> memoryview:
    """Raw bytes of a contiguous CPU tensor of any dtype (bf16 has no numpy dtype)."""
    import torch

    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def shard_ranges(n: int, shards: int, align: int = 1) -> list[tuple[int, int]]:
    """Up to `shards` contiguous [a, b) row ranges covering n rows, nearly equal in whole
    `align`-row windows (the embedder's sorting window: aligned shards embed every text exactly
    as one `embed` call over the corpus would); no empty ranges."""
    windows = -(-n // align) if n else 0
    shards = max(1, min(shards, windows))
    bounds = np.minimum(np.linspace(0, windows, shards + 1).round().astype(int) * align, n)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def shard_name(a: int, b: int) -> str:
    """Named by its rows, so a resume with another shard count never reuses a wrong shard."""
    return f"shard-{a:09d}-{b:09d}.npy"


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class RefreshWorker:
    """Embeds the corpus with a given encoder state and builds the faiss index (one per process:
    the Ray actor's body, or the thread backend's)."""

    def __init__(self, texts: list[str], embedder_config: dict, threads: int = 1,
                 in_process: bool = False):
        import torch

        from retro.components.retrieval.embedders import HFMeanPoolEmbedder

        self.texts = list(texts)
        self.in_process = in_process         # thread backend: a crash must not exit the trainer
        if not in_process:                   # torch's thread count is per process: not the trainer's
            torch.set_num_threads(max(1, threads))
        self.embedder = HFMeanPoolEmbedder(HFMeanPoolEmbedder.Config(**embedder_config))
        self.embedder.load()

    def precision(self) -> str:
        return self.embedder.precision

    def pid(self) -> int:
        return os.getpid()

    def run(self, job: dict, state: dict[str, Any]) -> dict:
        """Refresh `job["digest"]` with the encoder `state`; returns the snapshot's meta.

        job: root, digest, step, shards, factory, metric, crash_after_shards (fault injection:
        die after writing that many new shards, leaving a half-written temp file behind).
        """
        started = time.time()
        out = Path(job["root"]) / job["digest"]
        if (out / META).is_file():
            return json.loads((out / META).read_text())
        out.mkdir(parents=True, exist_ok=True)
        self._load_state(state)
        n = len(self.texts)
        ranges = shard_ranges(n, job["shards"], self.embedder.window)
        reused, written, shard_seconds = 0, 0, []
        for a, b in ranges:
            path = out / shard_name(a, b)
            if self._shard_ok(path, b - a):
                reused += 1
                continue
            if job.get("crash_after_shards") is not None and written >= job["crash_after_shards"]:
                self._crash(path)
            t0 = time.time()
            _save_npy_atomic(path, self.embedder.embed(self.texts[a:b]))
            shard_seconds.append(round(time.time() - t0, 4))
            written += 1
        emb = np.concatenate([np.load(out / shard_name(a, b)) for a, b in ranges]) if n else \
            np.zeros((0, self.embedder._model.config.hidden_size), np.float32)
        _save_npy_atomic(out / EMBEDDINGS, emb.astype(np.float32, copy=False))
        t_index = time.time()
        write_index(out / INDEX, emb, job["factory"], job["metric"])
        meta = {"digest": job["digest"], "step": job["step"], "n_docs": n,
                "dim": int(emb.shape[1]), "factory": job["factory"], "metric": job["metric"],
                "precision": self.embedder.precision, "shards": len(ranges),
                "shards_reused": reused, "shard_seconds": shard_seconds,
                "index_seconds": round(time.time() - t_index, 4),
                "started_at": started, "finished_at": time.time(), "pid": os.getpid()}
        meta["seconds"] = round(meta["finished_at"] - started, 4)
        write_json_atomic(out / META, meta)
        for a, b in ranges:                                 # complete: shards are redundant
            (out / shard_name(a, b)).unlink(missing_ok=True)
        for tmp in out.glob(".*.tmp"):                      # a killed attempt's half-written file
            tmp.unlink(missing_ok=True)
        return meta

    def embed_with(self, state: dict[str, Any], texts: list[str]) -> np.ndarray:
        """`texts` embedded by the encoder `state` exactly as a refresh embeds (same precision
        path): what a staleness check compares the stale embeddings with."""
        self._load_state(state)
        return self.embedder.embed(list(texts))

    def _load_state(self, state: dict[str, Any]) -> None:
        model = self.embedder._model
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise UserError(f"the document encoder snapshot does not fit the refresher's "
                            f"encoder ({self.embedder.path}): {str(e).splitlines()[0]}; the "
                            "refresher must start from the folder the document tower was "
                            "initialised from") from None
        self.embedder._bf16 = None           # the bf16 inference copy is rebuilt from `state`

    @staticmethod
    def _shard_ok(path: Path, rows: int) -> bool:
        if not path.is_file():
            return False
        try:
            return np.load(path, mmap_mode="r").shape[0] == rows
        except (ValueError, OSError):
            return False

    def _crash(self, next_shard: Path) -> None:
        next_shard.with_name(f".{next_shard.name}.{os.getpid()}.tmp").write_bytes(b"\x93NUMPY")
        if self.in_process:
            raise _InjectedCrash(f"injected crash before {next_shard.name}")
        os._exit(17)

def write_index(path: Path, emb: np.ndarray, factory: str, metric: str) -> None:
    """A faiss index over `emb` (trained on it when the factory needs training), written
    atomically to `path`."""
    import faiss

    from retro.components.retrieval.faiss_index import FaissConfig, FaissIndex

    spec = FaissIndex(FaissConfig(factory=factory, metric=metric))
    index = spec.build(emb.shape[1])
    x = np.ascontiguousarray(emb, dtype=np.float32)
    if not index.is_trained:
        index.train(x)
    index.add(x)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


class IndexRefresher:
    """Drives one refresh worker (a Ray actor, or a thread without Ray): one refresh at a time.

    Args:
        root: folder of the content-addressed refreshed indexes.
        texts: the corpus (row i = document id i).
        corpus_digest: identifies `texts` (part of every digest).
        encoder_dir: the HF encoder folder the document tower was initialised from (the actor
            loads it once, then each refresh loads a state dict into it).
        max_length, batch_size, sort_window, normalize, exclude_special_tokens, precision: as
            in the `hf-mean-pool` embedder (`precision: auto` is bf16 on AVX512-BF16 / AMX
            CPUs); shards are whole sorting windows, so with the embed stage's settings a
            refresh of the unchanged encoder reproduces its embeddings bit for bit.
        factory, metric: the faiss index of each refresh (`Flat`: exact).
        shards: re-embedding shards per refresh (the unit a crash resumes at).
        threads: torch threads of the worker.
        backend: `ray` (an actor; needs a Ray connection), `thread`, or `auto` (ray when
            `ray.is_initialized()`).
        actor_cpus, actor_gpus: logical CPUs / GPUs the actor reserves (a GPU actor embeds on
            its GPU; without one the embedder runs on CPU).
        max_retries: times a refresh whose worker died is resubmitted on a fresh worker.
        crash_after_shards: fault injection for tests: the first attempt of each refresh dies
            after writing this many shards.
    """

    def __init__(self, root: Path, texts: list[str], corpus_digest: str, encoder_dir: str, *,
                 max_length: int = 256, batch_size: int = 128, sort_window: int = 16,
                 normalize: bool = True,
                 exclude_special_tokens: bool = True, precision: str = "auto",
                 factory: str = "Flat", metric: str = "ip", shards: int = 4, threads: int = 1,
                 backend: Backend = "auto", actor_cpus: float = 0, actor_gpus: float = 0,
                 max_retries: int = 1,
                 crash_after_shards: Optional[int] = None):
        from retro.components.precision import resolve_precision

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.texts = list(texts)
        self.corpus_digest = corpus_digest
        self.factory, self.metric, self.shards = factory, metric, shards
        self.embedder_config = {"model": str(encoder_dir), "max_length": max_length,
                                "batch_size": batch_size, "sort_window": sort_window,
                                "normalize": normalize,
                                "exclude_special_tokens": exclude_special_tokens,
                                "precision": precision}
        self.threads, self.actor_cpus, self.actor_gpus = threads, actor_cpus, actor_gpus
        self.max_retries = max_retries
        self.crash_after_shards = crash_after_shards
        self.backend = self._pick_backend(backend)
        # The worker embeds on a GPU only if it sees one (an actor without `actor_gpus` does not).
        device = "cuda" if (self.backend == "thread" or actor_gpus) and _cuda() else "cpu"
        resolved = resolve_precision(precision, device) if precision == "auto" else precision
        # Everything that changes the vectors (batching does, in the last bits); the encoder
        # folder stands for its tokenizer and config (the weights are hashed from the state).
        self.settings = json.dumps({**self.embedder_config, "metric": metric,
                                    "precision": resolved, "device": device}, sort_keys=True)
        self._worker: Any = None
        self._local: Optional[RefreshWorker] = None      # in-process embedder of `embed`
        self._pending: Optional[dict] = None     # job, handle (ref / future), attempt, state

    @staticmethod
    def _pick_backend(backend: Backend) -> str:
        if backend != "auto":
            return backend
        ray = sys.modules.get("ray")
        return "ray" if ray is not None and ray.is_initialized() else "thread"

    # -- worker lifecycle -------------------------------------------------------------------
    def _start_worker(self) -> None:
        if self.backend == "ray":
            import ray

            actor = ray.remote(RefreshWorker).options(num_cpus=self.actor_cpus,
                                                      num_gpus=self.actor_gpus, max_restarts=0)
            self._worker = actor.remote(self.texts, self.embedder_config, self.threads)
        else:
            self._worker = (ThreadPoolExecutor(1, thread_name_prefix="index-refresh"),
                            RefreshWorker(self.texts, self.embedder_config, self.threads,
                                          in_process=True))

    def _dispatch(self, job: dict, state: Any) -> Any:
        if self._worker is None:
            self._start_worker()
        if self.backend == "ray":
            return self._worker.run.remote(job, state)
        pool, worker = self._worker
        return pool.submit(worker.run, job, state)

    # -- public API -------------------------------------------------------------------------
    def start(self) -> int:
        """Start the worker now (it loads the encoder: seconds) instead of at the first submit;
        returns the pid of the process that embeds."""
        if self._worker is None:
            self._start_worker()
        if self.backend == "ray":
            import ray

            return int(ray.get(self._worker.pid.remote()))
        return os.getpid()

    def digest(self, doc_encoder_state: dict[str, Any]) -> str:
        return snapshot_digest(doc_encoder_state, self.corpus_digest, self.factory,
                               self.settings)

    def submit(self, doc_encoder_state: dict[str, Any], step: int) -> str:
        """Start refreshing with a CPU copy of `doc_encoder_state`; returns at once with the
        digest. A digest already built is not re-embedded (`poll` returns it next).

        Raises:
            RuntimeError: a refresh is already in flight (`in_flight()`; call `poll` first).
        """
        if self._pending is not None:
            raise RuntimeError("a refresh is already in flight; poll() or wait() for it first")
        state = {k: v.detach().to("cpu", copy=True) for k, v in doc_encoder_state.items()}
        digest = self.digest(state)
        job = {"root": str(self.root), "digest": digest, "step": int(step),
               "shards": self.shards, "factory": self.factory, "metric": self.metric,
               "crash_after_shards": self.crash_after_shards, "submitted_at": time.time()}
        if IndexSnapshot.complete(self.root, digest):
            self._pending = {"job": job, "handle": None, "attempt": 0, "state": None}
            return digest
        if self.backend == "ray":
            import ray

            state = ray.put(state)
        self._pending = {"job": job, "handle": self._dispatch(job, state), "attempt": 0,
                         "state": state}
        return digest

    def in_flight(self) -> bool:
        return self._pending is not None

    def poll(self) -> Optional[IndexSnapshot]:
        """The finished refresh (once), else None; never blocks."""
        if self._pending is None:
            return None
        return self._collect(block=False)

    def wait(self, timeout: Optional[float] = None) -> IndexSnapshot:
        """Block until the refresh in flight finishes.

        Raises:
            RuntimeError: nothing in flight. RefreshFailed: it failed after its retries.
        """
        if self._pending is None:
            raise RuntimeError("no refresh in flight")
        deadline = None if timeout is None else time.time() + timeout
        while True:
            snap = self._collect(block=True, timeout=None if deadline is None
                                 else max(0.0, deadline - time.time()))
            if snap is not None:
                return snap
            if deadline is not None and time.time() >= deadline:
                raise TimeoutError(f"refresh {self._pending['job']['digest'][:12]} still "
                                   f"running after {timeout}s")

    def build_now(self, doc_encoder_state: dict[str, Any], step: int) -> IndexSnapshot:
        """Synchronous refresh (the initial index)."""
        self.submit(doc_encoder_state, step)
        return self.wait()

    def embed(self, doc_encoder_state: dict[str, Any], texts: list[str]) -> np.ndarray:
        """Embed `texts` in this process with the encoder state, through the same embedder,
        settings and precision as a refresh (bf16 weights under `precision: auto` here), so a
        staleness probe compares like with like: with the snapshot's own state the recall is 1.
        (Feeding the probe an fp32 tower against a bf16 refresh would show drift that is only
        rounding.)"""
        if self._local is None:
            self._local = RefreshWorker([], self.embedder_config, in_process=True)
        return self._local.embed_with(doc_encoder_state, texts)

    @property
    def precision(self) -> str:
        """The resolved precision refreshes embed in (`bf16` / `fp32`)."""
        return json.loads(self.settings)["precision"]

    def prune(self, keep: set[str]) -> list[str]:
        """Delete every refreshed index under `root` whose digest is not in `keep` (nor in
        flight); returns the deleted digests. Keep what the latest checkpoint points at."""
        import shutil

        if self._pending is not None:
            keep = keep | {self._pending["job"]["digest"]}
        gone = [p.name for p in self.root.iterdir()
                if p.is_dir() and len(p.name) == 64 and p.name not in keep]
        for name in gone:
            shutil.rmtree(self.root / name, ignore_errors=True)
        return gone

    def close(self) -> None:
        """Stop the worker (an unfinished refresh keeps its finished shards on disk)."""
        self._stop_worker()
        self._pending = None

    def _stop_worker(self) -> None:
        if self._worker is not None:
            if self.backend == "ray":
                import ray

                try:
                    ray.kill(self._worker)
                except Exception:  # noqa: BLE001 - already dead (a crashed refresh)
                    pass
            else:
                self._worker[0].shutdown(wait=True, cancel_futures=True)
        self._worker = None

    # -- internals --------------------------------------------------------------------------
    def _collect(self, block: bool, timeout: Optional[float] = None) -> Optional[IndexSnapshot]:
        p = self._pending
        if p["handle"] is None:
            self._pending = None
            return IndexSnapshot.open(self.root, p["job"]["digest"])
        try:
            meta = self._result(p["handle"], block, timeout)
        except Exception as e:  # noqa: BLE001 - sorted below
            if not isinstance(e, _WorkerDied):
                self._pending = None               # a failed refresh is no longer in flight
                raise
            if p["attempt"] >= self.max_retries:
                self._pending = None
                self._stop_worker()
                raise RefreshFailed(f"refresh {p['job']['digest'][:12]} (step "
                                    f"{p['job']['step']}): worker died {p['attempt'] + 1} "
                                    f"time(s): {e}; finished shards stay in "
                                    f"{self.root / p['job']['digest']}") from None
            self._stop_worker()                                 # a fresh worker resumes
            job = {**p["job"], "crash_after_shards": None}
            self._pending = {**p, "job": job, "attempt": p["attempt"] + 1,
                             "handle": self._dispatch(job, p["state"])}
            return None
        if meta is None:
            return None
        self._pending = None
        meta = {**meta, "submitted_at": p["job"]["submitted_at"], "retries": p["attempt"]}
        return IndexSnapshot(digest=p["job"]["digest"], path=self.root / p["job"]["digest"],
                             step=p["job"]["step"], meta=meta)

    def _result(self, handle: Any, block: bool, timeout: Optional[float]) -> Optional[dict]:
        if self.backend == "ray":
            import ray
            from ray.exceptions import OutOfMemoryError, RayActorError, WorkerCrashedError

            ready, _ = ray.wait([handle], timeout=(timeout if block else 0))
            if not ready:
                return None
            try:
                return ray.get(ready[0])
            except (RayActorError, OutOfMemoryError, WorkerCrashedError) as e:
                # the process is gone (killed, crashed, or Ray's memory monitor): resumable
                raise _WorkerDied(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") \
                    from None
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, UserError):          # e.g. a state that does not fit
                    raise e.cause from None
                raise RefreshFailed(f"refresh failed in the worker: {e.cause!r}") from None
        fut: Future = handle
        if not block and not fut.done():
            return None
        try:
            return fut.result(timeout=timeout)
        except TimeoutError:
            return None
        except _InjectedCrash as e:
            raise _WorkerDied(str(e)) from None


class _WorkerDied(Exception):
    pass
