"""Realizing a blend: how many samples each source gives, which records, and the token rows.

Counts: a source with `samples` gives that many; with `epochs`, round(epochs x records); the
weighted sources share what is left of the run's `steps x global_batch` in proportion to their
weights. Records: each source's records are permuted with (seed, source index); the first
`eval` of them are held out for validation, and training cycles through the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from retro.components.instruct.render import SYSTEM, encode
from retro.components.instruct.sources import Loaded
from retro.platform.errors import UserError
from retro.platform.store import open_memmap


@dataclass
class Part:
    """One source's share of the realized blend."""

    index: int
    type: str
    path: str
    records: int
    skipped: int
    sha256: str
    train: list[int]          # record indices, in blend order (repeats when cycling)
    eval: list[int]

    def summary(self) -> dict[str, Any]:
        return {"type": self.type, "path": self.path, "records": self.records,
                "skipped": self.skipped, "samples": len(self.train),
                "eval_samples": len(self.eval), "sha256": self.sha256}


def counts(nodes: Sequence[Any], sizes: Sequence[int], total: int) -> list[int]:
    """Training samples per source (see module doc).

    Raises:
        UserError: weighted sources get nothing because `samples`/`epochs` use up the run.
    """
    fixed: dict[int, int] = {}
    for i, (node, n) in enumerate(zip(nodes, sizes)):
        if node.samples is not None:
            fixed[i] = node.samples
        elif node.epochs is not None:
            fixed[i] = max(1, round(node.epochs * n))
    weighted = [i for i in range(len(nodes)) if i not in fixed]
    left = total - sum(fixed.values())
    out = [fixed.get(i, 0) for i in range(len(nodes))]
    if weighted:
        if left <= 0:
            raise UserError(
                f"instruct.blend: the sources with `samples`/`epochs` already fill the run's "
                f"{total} samples (steps x global_batch), leaving nothing for the weighted "
                f"source(s) {weighted}; lower them, or raise steps")
        w = np.array([nodes[i].weight if nodes[i].weight is not None else 1.0
                      for i in weighted], dtype=np.float64)
        share = left * w / w.sum()
        base = np.floor(share).astype(int)
        for j in np.argsort(-(share - base), kind="stable")[:left - base.sum()]:
            base[j] += 1                                  # largest remainders get the rest
        for i, c in zip(weighted, base):
            out[i] = int(c)
    return out


def realize(nodes: Sequence[Any], loaded: Sequence[Loaded], total: int, eval_samples: int,
            seed: int) -> list[Part]:
    """Pick each source's training and held-out records."""
    sizes = [len(x.conversations) for x in loaded]
    train_counts = counts(nodes, sizes, total)
    eval_share = _eval_counts(train_counts, sizes, eval_samples)
    parts = []
    for i, (node, src, n_train, n_eval) in enumerate(zip(nodes, loaded, train_counts,
                                                         eval_share)):
        perm = np.random.default_rng([seed, i]).permutation(len(src.conversations))
        held, pool = perm[:n_eval], perm[n_eval:]
        train = [int(pool[j % len(pool)]) for j in range(n_train)]
        parts.append(Part(i, node.type, str(node.path), len(src.conversations), src.skipped,
                          src.sha256, train, [int(x) for x in held]))
    return parts


def _eval_counts(train_counts: list[int], sizes: list[int], total: int) -> list[int]:
    """Held-out records per source, proportional to its training share; each source keeps at
    least one record for training."""
    weights = np.array(train_counts, dtype=np.float64)
    if total <= 0 or weights.sum() == 0:
        return [0] * len(sizes)
    want = np.floor(total * weights / weights.sum()).astype(int)
    want[np.argmax(weights)] += total - want.sum()
    return [int(min(w, n - 1)) for w, n in zip(want, sizes)]


def write_rows(parts: list[Part], loaded: Sequence[Loaded], which: str, out: Any,
               tokenize: Callable[[str], list[int]], eod: int, seq_length: int,
               system: str = SYSTEM) -> dict[str, int]:
    """Render and tokenize the `which` ("train"/"eval") records into `<out>_tokens.npy` and
    `<out>_mask.npy` (rows in blend order); returns counts (rows, truncated)."""

    n = sum(len(getattr(p, which)) for p in parts)
    if n == 0:                            # numpy cannot memmap an empty file
        np.save(f"{out}_tokens.npy", np.zeros((0, seq_length + 1), np.int32))
        np.save(f"{out}_mask.npy", np.zeros((0, seq_length + 1), np.uint8))
        return {"rows": 0, "truncated": 0, "loss_tokens": 0}
    tokens = open_memmap(f"{out}_tokens.npy", "int32", (n, seq_length + 1), mode="w+")
    mask = open_memmap(f"{out}_mask.npy", "uint8", (n, seq_length + 1), mode="w+")
    row, truncated, cache = 0, 0, {}
    for part in parts:
        convs = loaded[part.index].conversations
        for rec in getattr(part, which):
            if rec not in cache:   # cycling sources repeat records: tokenize each once
                cache[rec] = encode(convs[rec].turns, tokenize, eod, seq_length, system)
            tokens[row], mask[row], cut = cache[rec]
            truncated += cut
            row += 1
        cache.clear()
    tokens.flush()
    mask.flush()
    return {"rows": n, "truncated": truncated,
            "loss_tokens": int(np.asarray(mask).sum(dtype=np.int64))}
