"""Shared helpers for the training tests: tiny models, real wiki token rows, jobs."""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np

from retro.components.training.config import RunSettings, Schedule, resolve
from retro.components.training.data import NpyRows
from retro.components.training.loop import TrainJob
from retro.components.training.models import build_fresh
from retro.platform.registry import registry

registry.load_plugins()

VOCAB = 512


def nano(retro: bool = False, **fields: Any) -> dict[str, Any]:
    """The `model` node of retro-nano (4 layers x 64), plain decoder unless `retro`."""
    return {"type": "retro", "preset": "retro-nano", "retro": retro, **fields}


def model_factory(node: dict[str, Any] | None = None, vocab: int = VOCAB, m: int = 16,
                  **kw: Any):
    """A picklable zero-argument model builder (product code, so Ray workers can import it)."""
    node = node or nano()
    return functools.partial(build_fresh, node, vocab, m, retro=node.get("retro", True), **kw)


def wiki_rows(shared_data: Path, out: Path, seq_length: int = 64, n_passages: int = 1500,
              valid_fraction: float = 0.1, vocab: int = VOCAB) -> tuple[Path, Path]:
    """Real wiki passages -> a byte-level BPE of `vocab` tokens -> train/valid row files
    [n, seq_length] (documents joined with EOD, as the `sequences` stage does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = []
    with gzip.open(shared_data / "wiki_featured_passages" / "passages.part-00.jsonl.gz",
                   "rt") as fh:
        for line in fh:
            texts.append(json.loads(line)["text"])
            if len(texts) == n_passages:
                break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<eod>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    eod = tok.token_to_id("<eod>")
    n_valid = int(len(texts) * valid_fraction)
    paths = []
    for name, part in (("train", texts[:-n_valid]), ("valid", texts[-n_valid:])):
        stream = np.concatenate([np.array(e.ids + [eod], dtype=np.uint16)
                                 for e in tok.encode_batch(part)])
        rows = stream[: len(stream) // seq_length * seq_length].reshape(-1, seq_length)
        paths.append(out / f"{name}.npy")
        np.save(paths[-1], rows)
    return paths[0], paths[1]


def job(out: Path, train: Path, valid: Path | None = None, *, seq_length: int = 64,
        steps: int = 6, global_batch: int = 8, lr: float = 3e-3, model=None, seed: int = 0,
        neighbours=None, valid_neighbours=None, **run: Any) -> TrainJob:
    """A TrainJob over .npy rows with a cosine schedule."""
    sched = resolve(Schedule(steps=steps, global_batch=global_batch, lr=lr, min_lr=lr / 10,
                             warmup=1), seq_length)
    # fp32 unless a test asks: the invariance tests compare losses to 1e-5, and bf16 rounding
    # (precision `auto` on a bf16-capable CPU) depends on how rows are batched
    settings = RunSettings(**{"eval_interval": steps, "eval_batches": 2,
                              "checkpoint_interval": steps, "precision": "fp32", **run})
    return TrainJob(
        name="test", model=model or model_factory(), seed=seed, out_dir=str(out),
        train_data=NpyRows(str(train), seq_length, neighbours=neighbours),
        val_data=NpyRows(str(valid), seq_length, neighbours=valid_neighbours) if valid else None,
        schedule=sched, run=settings)


def rows_of(path: Path) -> list[dict[str, Any]]:
    """Metric rows a job wrote."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def free_port() -> int:
    """A free TCP port on loopback (for a gloo rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_gloo(worker, *args: Any, hang_s: float, what: str, world: int = 2) -> None:
    """Run `worker(rank, world, port, *args)` on `world` spawned processes; a hang (a collective
    that never returns) kills them and fails the test instead of blocking the suite."""
    import time

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.spawn(worker, args=(world, free_port(), *args), nprocs=world, join=False)
    deadline = time.monotonic() + hang_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world}-worker {what} did not finish in {hang_s} s "
                        "(a collective hung)")
