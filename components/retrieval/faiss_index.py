"""The `faiss` index component and the `train-index` / `fill-index` stages.

Any `faiss.index_factory` string works (`Flat`, `IVF4096,Flat`, `IVF4096,PQ64`,
`OPQ64_128,IVF4194304_HNSW32,PQ64`, `HNSW32,Flat`, ...). The index is trained on a seeded sample
of the DB embeddings, then filled in shards: each shard computes `sa_encode` codes in parallel
and the driver appends them with `add_sa_codes` (bit-identical to a serial `add`, Megatron's
`faiss-par-add`); indexes without standalone codes (HNSW) are filled with `add` in blocks.
Query parameters (`nprobe`, `efSearch`) are applied by name through `faiss.ParameterSpace`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from pydantic import Field, field_validator

from retro.components.devices import faiss_gpus
from retro.components.retrieval.common import (build_component, done_marker, run_shards,
                                              shard_count, shard_ranges, write_meta)
from retro.platform.errors import UserError
from retro.platform.registry import StrictModel, register, registry
from retro.platform.spec.node import Node
from retro.platform.stage import NoParams, StageContext, StageParams, stage
from retro.platform.store import open_memmap

TRAINED = "trained.faissindex"
FILLED = "index.faissindex"
_ROWS_PER_SHARD = 200_000
_ADD_BLOCK = 65_536
_FACTORY_TOKEN = re.compile(r"^[A-Za-z][A-Za-z0-9_.]*$")


class FaissConfig(StrictModel):
    """A faiss index over the DB chunk embeddings."""

    factory: str = "Flat"
    """faiss `index_factory` string, e.g. `Flat` (exact), `IVF1024,Flat`, `IVF4096,PQ64`,
    `OPQ64_128,IVF4194304_HNSW32,PQ64` (InstructRetro 48B), `HNSW32,Flat`."""
    metric: Literal["ip", "l2"] = "ip"
    """Inner product (cosine on normalised embeddings) or L2 (Megatron's default)."""
    dim: Optional[int] = Field(None, ge=1)
    """Expected embedding size; None takes the embedder's. A mismatch is an error."""
    train_fraction: float = Field(1.0, gt=0, le=1)
    """Fraction of the DB embeddings sampled to train the index."""
    train_size: Optional[int] = Field(None, ge=1)
    """Upper bound on training vectors (applied after train_fraction)."""
    seed: int = 0
    """Seed of the training sample."""
    nprobe: Optional[int] = Field(None, ge=1)
    """IVF lists probed per query (applied by name); None keeps faiss' default (1)."""
    ef_search: Optional[int] = Field(None, ge=1)
    """HNSW search depth (`efSearch`, or `quantizer_efSearch` for IVF_HNSW quantizers)."""

    @field_validator("factory")
    @classmethod
    def _syntax(cls, value: str) -> str:
        parts = [p.strip() for p in value.split(",")]
        if not value.strip() or not all(_FACTORY_TOKEN.match(p) for p in parts):
            raise ValueError(f"{value!r} is not a faiss index_factory string (comma-separated "
                             "parts such as `IVF1024,PQ32`, `HNSW32,Flat`, `Flat`)")
        return ",".join(parts)


registry.add_kind("index", "Nearest-neighbour index over chunk embeddings.")


@register("index", "faiss", default=True)
class FaissIndex:
    """Builds, checks, reads and parameterises faiss indexes for one config."""

    Config = FaissConfig

    def __init__(self, config: Any):
        self.config = config

    @property
    def metric(self) -> int:
        import faiss

        return faiss.METRIC_INNER_PRODUCT if self.config.metric == "ip" else faiss.METRIC_L2

    def check(self, dim: int) -> None:
        """Build the factory string once on a tiny list count, so errors come before work.

        Raises:
            UserError: the string does not build for this dim (naming `retriever.index.factory`).
        """
        import faiss

        if self.config.dim is not None and self.config.dim != dim:
            raise UserError(f"retriever.index.dim is {self.config.dim} but the embeddings have "
                            f"dim {dim}; fix retriever.index.dim or the embedder")
        probe = re.sub(r"IVF\d+", "IVF1", self.config.factory)  # same structure, tiny lists
        try:
            faiss.index_factory(dim, probe, self.metric)
        except RuntimeError as e:
            raise UserError(f"retriever.index.factory {self.config.factory!r} is invalid for "
                            f"{dim}-d embeddings: {faiss_message(e)}; hint: see the faiss wiki page "
                            "'The index factory' (e.g. PQm needs dim divisible by m)") from None

    def build(self, dim: int):
        """An empty (untrained) index."""
        import faiss

        self.check(dim)
        return faiss.index_factory(dim, self.config.factory, self.metric)

    def apply_query_params(self, index: Any) -> None:
        """Set nprobe / efSearch by name via ParameterSpace."""
        import faiss

        ps = faiss.ParameterSpace()
        if self.config.nprobe is not None:
            if faiss.try_extract_index_ivf(index) is None:
                raise UserError(f"retriever.index.nprobe is set but {self.config.factory!r} "
                                "has no IVF stage; remove nprobe")
            ps.set_index_parameter(index, "nprobe", self.config.nprobe)
        if self.config.ef_search is not None:
            name = "efSearch" if _is_hnsw(index) else "quantizer_efSearch"
            try:
                ps.set_index_parameter(index, name, self.config.ef_search)
            except RuntimeError:
                raise UserError(f"retriever.index.ef_search is set but {self.config.factory!r} "
                                "has no HNSW stage; remove ef_search") from None

    def read(self, path: Path, mmap: bool = True):
        """Read an index file, memory-mapped when possible, with query params applied."""
        import faiss

        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError:
            index = faiss.read_index(str(path))
        self.apply_query_params(index)
        return index


def faiss_message(e: Exception) -> str:
    """faiss' own message without its C++ location prefix."""
    msg = str(e).strip().splitlines()[-1]
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", msg)


def _is_hnsw(index: Any) -> bool:
    import faiss

    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) \
        else faiss.downcast_index(index)
    return isinstance(inner, faiss.IndexHNSW)


def to_gpu(index: Any, log: Any = None):
    """All-GPU copy of an index when faiss sees GPUs and supports the type; else the index."""
    import faiss

    if faiss.get_num_gpus() == 0:
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError) as e:
        if log:
            log.info("index stays on CPU (%s)", str(e).splitlines()[0])
        return index


def stage_gpu_copy(ctx: Any, index: Any):
    """The index copied to all GPUs when the stage was given GPUs (`resources.<stage>.
    gpus_per_worker > 0`) and faiss has GPU support (faiss-gpu, the `gpu` extra) and GPUs;
    None otherwise, or when faiss has no GPU version of this index type (the caller then
    works on the CPU index)."""
    if faiss_gpus(ctx) == 0:
        return None
    gpu = to_gpu(index, ctx.log)
    return None if gpu is index else gpu


def n_train_vectors(n: int, cfg: FaissConfig) -> int:
    """How many embeddings train the index."""
    k = max(1, int(round(cfg.train_fraction * n)))
    return min(k, cfg.train_size) if cfg.train_size else k


class TrainIndexParams(StageParams):
    index: Node("index")
    """The index node."""


@stage("train-index", version="2", params=TrainIndexParams,
       inputs={"embeddings": "DB chunk embeddings (embed)"},
       estimate=lambda p: {"factory": p.index.factory})
def train_index(ctx: StageContext[TrainIndexParams]) -> dict:
    """Train the configured index on a seeded sample of the DB embeddings.

    Params: `index` (the index node). Inputs: `embeddings`.
    Files: `trained.faissindex` (trained, empty), `meta.json` {dim, n_train, factory, metric}.
    """
    import faiss

    spec = build_component("index", ctx.params.index)
    emb = open_memmap(ctx.inputs["embeddings"].path / "embeddings.npy")
    n, dim = emb.shape
    index = spec.build(dim)
    n_train = 0
    if not index.is_trained:
        n_train = n_train_vectors(n, spec.config)
        rows = np.sort(np.random.default_rng(spec.config.seed).choice(n, n_train, replace=False))
        x = np.ascontiguousarray(emb[rows], dtype=np.float32)
        ctx.log.info("training %s on %d of %d vectors", spec.config.factory, n_train, n)
        gpu = stage_gpu_copy(ctx, index)
        if gpu is None and faiss_gpus(ctx):
            _gpu_clustering(index, spec.metric, ctx.log)
        try:
            if gpu is None:
                index.train(x)
            else:
                gpu.train(x)
                index = faiss.index_gpu_to_cpu(gpu)   # the artifact is always a CPU index
        except RuntimeError as e:
            raise UserError(f"training {spec.config.factory!r} on {n_train} vectors failed: "
                            f"{faiss_message(e)}; hint: IVFk needs at least k "
                            "training vectors and PQ/OPQ at least 256: raise train_fraction or "
                            "train_size, or use a smaller index") from None
    faiss.write_index(index, str(ctx.out_dir / TRAINED))
    write_meta(ctx.out_dir, dim=dim, n_train=n_train, factory=spec.config.factory,
               metric=spec.config.metric)
    return {"dim": dim, "n_train": n_train}


def _gpu_clustering(index: Any, metric: int, log: Any) -> None:
    """Run IVF k-means on all GPUs when present (the coarse quantizer is copied back)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or faiss.get_num_gpus() == 0:
        return
    ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, metric))
    log.info("IVF clustering on %d GPUs", faiss.get_num_gpus())


@stage("fill-index", version="2", params=NoParams,
       inputs={"index": "the trained, empty index (train-index)",
               "embeddings": "DB chunk embeddings (embed)"})
def fill_index(ctx: StageContext[NoParams]) -> dict:
    """Add every DB embedding to the trained index, in order (row i = chunk i).

    Inputs: `index` (train-index), `embeddings`.
    Files: `index.faissindex` (readable with IO_FLAG_MMAP), `meta.json` {dim, ntotal}.
    """
    import faiss

    trained = ctx.inputs["index"].path / TRAINED
    emb_path = ctx.inputs["embeddings"].path / "embeddings.npy"
    n, dim = open_memmap(emb_path).shape
    index = faiss.read_index(str(trained))
    if index.d != dim:
        raise UserError(f"dims mismatch: the trained index has d={index.d} but the embeddings "
                        f"have dim {dim}; rebuild the index from these embeddings")
    target = _codes_target(index)
    gpu = stage_gpu_copy(ctx, index)
    if gpu is not None:            # one GPU add beats CPU encode shards; written back as CPU
        _add_serial(ctx, gpu, emb_path, n)
        index = faiss.index_gpu_to_cpu(gpu)
    elif target is None:
        _add_serial(ctx, index, emb_path, n)
    else:
        ranges = shard_ranges(n, shard_count(ctx, n, _ROWS_PER_SHARD))
        jobs = [{"index": str(trained), "emb": str(emb_path), "a": a, "b": b,
                 "out": str(ctx.work_dir / f"codes-{a:012d}.npy")} for a, b in ranges]
        run_shards(ctx, _encode_shard, jobs, [b - a for a, b in ranges], "fill-index encode")
        for job in jobs:
            target.add_sa_codes(np.load(job["out"]))
        index.ntotal = target.ntotal
    faiss.write_index(index, str(ctx.out_dir / FILLED))
    write_meta(ctx.out_dir, dim=dim, ntotal=int(index.ntotal))
    return {"ntotal": int(index.ntotal), "bytes": (ctx.out_dir / FILLED).stat().st_size}


def _codes_target(index: Any):
    """The (inner) index that accepts add_sa_codes for this index's sa_encode, or None."""
    import faiss

    try:
        index.sa_code_size()
    except RuntimeError:
        return None
    inner = index
    while isinstance(inner, faiss.IndexPreTransform):  # codes belong to the wrapped index
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, (faiss.IndexIVF, faiss.IndexFlatCodes)):
        return inner
    return None


def _encode_shard(job: dict) -> str:
    import faiss

    marker = done_marker(Path(job["out"]).parent, Path(job["out"]).name)
    if not marker.exists():
        index = faiss.read_index(job["index"])
        emb = open_memmap(job["emb"])
        codes = np.concatenate([index.sa_encode(np.ascontiguousarray(emb[a:min(a + _ADD_BLOCK,
                                                                            job["b"])],
                                                                        dtype=np.float32))
                                for a in range(job["a"], job["b"], _ADD_BLOCK)])
        np.save(job["out"], codes)
        marker.touch()
    return job["out"]


def _add_serial(ctx: Any, index: Any, emb_path: Path, n: int) -> None:
    emb = open_memmap(emb_path)
    with ctx.progress(n, "fill-index add") as bar:
        for a in range(0, n, _ADD_BLOCK):
            index.add(np.ascontiguousarray(emb[a:a + _ADD_BLOCK], dtype=np.float32))
            bar.update(min(_ADD_BLOCK, n - a))

