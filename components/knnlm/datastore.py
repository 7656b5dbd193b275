"""The `knn-datastore` stage and `Datastore`: one (key, value, document) row per train token.

For every train sequence i (the `sequences` artifact of the train split, L tokens) and every
position t < L - 1, the row i·(L-1) + t holds the LM's key at t (`keys.forward_keys`), the value
token t + 1, and the document of token t + 1 (for same-document exclusion). Like
urvashik/knnlm's `build_dstore` / knn-transformers' `KNNSaver`, one forward pass per sequence,
keys float32 (or float16 with `fp16`, as `--dstore-fp16` / knn-transformers) and values int32
(not int16, which overflows vocabularies over 32,767: a pitfall of `--dstore-fp16`).

Departure: the paper gives every target >= 512 (WT103: 1536) tokens of prior context; here the
context is the sequence's prefix (0..L-2 tokens), the same context `eval-ppl` scores with.

The keys file is `embeddings.npy` [N, d], the layout `train-index` / `fill-index` read, so the
faiss index is built by the retrieval component's stages (any factory, sharded fill).
Shards are sequence ranges written in place with positioned file writes (not a memmap), so
the writer's memory stays one batch whatever the corpus size; a done-marker per shard resumes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from pydantic import Field

from retro.components.devices import stage_device, stage_gpus
from retro.components.precision import Precision, inference_autocast, stage_precision
from retro.components.retrieval.chunking import SPLITS
from retro.components.retrieval.common import done_marker, read_meta, run_shards, \
    shard_ranges, write_meta
from retro.platform.errors import UserError
from retro.platform.stage import StageContext, StageParams, stage
from retro.platform.store import open_memmap
from retro.components.evaluators.lm import load_eval_lm
from retro.components.knnlm.keys import forward_keys

KEYS, VALUES, DOCS = "embeddings.npy", "values.npy", "docs.npy"
_ROWS_PER_SHARD = 65_536     # datastore rows per shard: resume and progress granularity
_BATCH = 4                   # sequences per forward


class KnnDatastoreParams(StageParams):
    key: Literal["ffn_input", "final"] = "ffn_input"
    """Which hidden state is the key (see `keys`)."""
    fp16: bool = False
    """Keys stored as float16."""
    max_train_sequences: Optional[int] = Field(None, ge=1)
    """At most this many train sequences (the first ones)."""
    precision: Precision = "auto"
    """LM compute precision (the eval's queries use the same)."""


def stream_docs(tokens_dir: Path, chunk_db_dir: Path, split: str) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    """(docs, starts) of a split's token stream, as the `sequences` stage lays it out: document
    docs[j] occupies stream positions [starts[j], starts[j+1]) (its tokens and its EOD)."""
    offsets = np.load(Path(tokens_dir) / "doc_offsets.npy")
    docs = np.flatnonzero(np.load(Path(chunk_db_dir) / "doc_split.npy") == SPLITS[split])
    starts = np.concatenate([[0], np.cumsum(np.diff(offsets)[docs] + 1)])
    return docs, starts


def position_docs(docs: np.ndarray, starts: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Document of each stream position."""
    return docs[np.searchsorted(starts, positions, side="right") - 1]


@stage("knn-datastore", version="2", params=KnnDatastoreParams, distributed=False,
       inputs={"model": "the LM whose keys are stored (import-gguf, lm-folder, a training "
                        "stage)",
               "sequences": "train sequences (sequences-train)",
               "tokens": "document tokens (tokenize), for each key's document",
               "chunk_db": "the documents' split (chunk-db)",
               "tokenizer": "the DB tokenizer (tokenizer)"},
       estimate=lambda p: {"key": p.key, "dtype": "float16" if p.fp16 else "float32"})
def knn_datastore(ctx: StageContext[KnnDatastoreParams]) -> dict[str, Any]:
    """Keys, values and documents of every train-split target token.

    Params: `key`, `fp16`, `max_train_sequences`, `precision`. Inputs: `model`, `sequences`
    (train), `tokens`, `chunk_db`, `tokenizer`.
    Files: `embeddings.npy` [N, d] float32|float16 (the keys), `values.npy` int32 [N],
    `docs.npy` int64 [N], `meta.json` {n, dim, dtype, key, seq_length, n_seq}.
    """

    seq_meta = read_meta(ctx.inputs["sequences"].path)
    if seq_meta["split"] != "train":
        raise UserError(f"stage {ctx.name}: the datastore is built over the train split, but "
                        f"its `sequences` input holds split {seq_meta['split']!r}")
    length = int(seq_meta["seq_length"])
    n_seq = min(int(seq_meta["n_seq"]), ctx.params.max_train_sequences or seq_meta["n_seq"])
    device = stage_device(ctx)          # the shards' device: their tasks get the stage's GPUs
    per_seq, precision = length - 1, stage_precision(ctx, ctx.params.precision, device)
    dim, vocab = _probe(ctx)
    n = n_seq * per_seq
    dtype = "float16" if ctx.params.fp16 else "float32"
    files = {KEYS: (dtype, (n, dim)), VALUES: ("int32", (n,)), DOCS: ("int64", (n,))}
    offsets = {}
    for name, (dt, shape) in files.items():   # header + preallocated body, written in place
        path = ctx.work_dir / name
        if not (path.exists() and open_memmap(path).shape == shape):
            open_memmap(path, dt, shape, mode="w+").flush()
        offsets[name] = open_memmap(path).offset
    seqs_per_shard = max(1, _ROWS_PER_SHARD // per_seq)
    ranges = shard_ranges(n_seq, max(ctx.resources.num_workers, -(-n_seq // seqs_per_shard)))
    job = {"model": str(ctx.inputs["model"].path), "tokenizer": str(ctx.inputs["tokenizer"].path),
           "sequences": str(ctx.inputs["sequences"].path), "tokens": str(ctx.inputs["tokens"].path),
           "chunk_db": str(ctx.inputs["chunk_db"].path), "work": str(ctx.work_dir),
           "offsets": offsets, "key": ctx.params.key, "dtype": dtype, "precision": precision,
           "threads": max(1, int(ctx.resources.cpus_per_worker)), "gpus": stage_gpus(ctx)}
    run_shards(ctx, _datastore_shard, [{**job, "a": a, "b": b} for a, b in ranges],
               [(b - a) * per_seq for a, b in ranges], "knn-datastore keys")
    for name in files:
        os.replace(ctx.work_dir / name, ctx.out_dir / name)
    meta = {"n": n, "dim": dim, "dtype": dtype, "key": ctx.params.key, "seq_length": length,
            "n_seq": n_seq, "vocab": vocab, "precision": precision}
    write_meta(ctx.out_dir, **meta)
    return {**meta, "bytes": sum((ctx.out_dir / f).stat().st_size for f in files)}


def _probe(ctx: StageContext) -> tuple[int, int]:
    """(key width, vocabulary) of the model, checked against the DB tokenizer."""
    import torch


    lm = load_eval_lm(ctx.inputs["model"].path, ctx.inputs["tokenizer"].path, threads=1)
    check_plain_lm(lm, ctx.name)
    keys, logp = forward_keys(lm.model.decoder, torch.zeros(1, 2, dtype=torch.long),
                              ctx.params.key)
    return int(keys.shape[-1]), int(logp.shape[-1])


def check_plain_lm(lm: Any, stage_name: str) -> None:
    """kNN-LM wraps a decoder-only LM; a Retro model's decoder needs its neighbours."""
    if lm.is_retro:
        raise UserError(f"stage {stage_name}: kNN-LM needs a causal LM without an encoder "
                        "(a GPT baseline, an imported HF model); this model is a Retro "
                        "model, whose decoder forward without neighbours is not its LM")


def _write_rows(path: Path, header: int, row_bytes: int, start: int, data: np.ndarray) -> None:
    with open(path, "r+b") as fh:
        fh.seek(header + start * row_bytes)
        fh.write(np.ascontiguousarray(data).tobytes())


def _datastore_shard(job: dict) -> None:
    import torch


    work = Path(job["work"])
    marker = done_marker(work, f"shard-{job['a']:012d}")
    if marker.exists():
        return
    device = "cuda" if job.get("gpus") and torch.cuda.is_available() else "cpu"
    lm = load_eval_lm(Path(job["model"]), Path(job["tokenizer"]), threads=job["threads"],
                      device=device)
    toks = open_memmap(Path(job["sequences"]) / "tokens.npy")
    length = toks.shape[1]
    per_seq = length - 1
    docs, starts = stream_docs(Path(job["tokens"]), Path(job["chunk_db"]), "train")
    for a in range(job["a"], job["b"], _BATCH):
        b = min(job["b"], a + _BATCH)
        ids = torch.from_numpy(np.asarray(toks[a:b], dtype=np.int64))
        with inference_autocast(lm.model.decoder, job["precision"], device):
            keys, _ = forward_keys(lm.model.decoder, ids, job["key"])
        keys = keys[:, :-1].reshape(-1, keys.shape[-1]).numpy().astype(job["dtype"])
        values = ids[:, 1:].reshape(-1).numpy().astype(np.int32)
        pos = (np.arange(a, b)[:, None] * length + np.arange(1, length)[None, :]).reshape(-1)
        row0 = a * per_seq
        _write_rows(work / KEYS, job["offsets"][KEYS], keys.shape[1] * keys.itemsize, row0, keys)
        _write_rows(work / VALUES, job["offsets"][VALUES], 4, row0, values)
        _write_rows(work / DOCS, job["offsets"][DOCS], 8, row0,
                    position_docs(docs, starts, pos).astype(np.int64))
    marker.touch()


class Datastore:
    """Reader of a `knn-datastore` artifact: `.keys` [N, d], `.values` [N], `.docs` [N]."""

    def __init__(self, artifact: Any):
        self.path = Path(getattr(artifact, "path", artifact))
        self.meta = read_meta(self.path)
        self.keys = open_memmap(self.path / KEYS)
        self.values = open_memmap(self.path / VALUES)
        self.docs = open_memmap(self.path / DOCS)

    def __len__(self) -> int:
        return len(self.values)
