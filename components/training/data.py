"""Training data as the loop sees it: rows of tokens, a loss mask, optional neighbour tokens.

Every split is a `TokenRows`: `batch(indices)` returns torch tensors for those rows. Which rows a
step uses is `GlobalBatchSampler.batch(step)`, a function of (seed, step) alone, so the order is
the same for any worker count and a resumed run continues exactly where it stopped.

Row layout: a row of `seq_length + 1` tokens gives inputs `row[:-1]` and labels `row[1:]`
(Megatron's samples); a row of exactly `seq_length` tokens is shifted inside itself and its last
position carries no loss. `loss_mask[i, t] = 1` means "predicting token t of row i counts".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import numpy as np

from retro.platform.errors import InputDataError


class NeighbourSource(Protocol):
    """Neighbour tokens of whole rows: `tokens(rows) -> int array [b, chunks, k, r]`."""

    def tokens(self, rows: np.ndarray) -> np.ndarray: ...


class GlobalBatchSampler:
    """Sample indices of optimizer step `step`: epoch-wise permutations seeded by (seed, epoch).

    Args:
        n: rows in the split.
        global_batch: rows per optimizer step.
        seed: the experiment seed.
    """

    def __init__(self, n: int, global_batch: int, seed: int):
        if n <= 0:
            raise InputDataError("the training split has no rows: nothing to train on")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def batch(self, step: int) -> np.ndarray:
        """Row indices of step `step` (length `global_batch`); epochs wrap around."""
        pos = np.arange(step * self.global_batch, (step + 1) * self.global_batch)
        epochs, within = np.divmod(pos, self.n)
        return np.array([self._perm(int(e))[w] for e, w in zip(epochs, within)], dtype=np.int64)


class TokenRows:
    """One split of training rows.

    Args:
        tokens: int array [N, seq_length (+1)] (a memmap is fine: only the rows asked for are read).
        seq_length: model input length.
        loss_mask: optional 0/1 array shaped like `tokens`; None counts every predicted token.
        neighbours: optional source of neighbour tokens per row.
        pad_id: token id used for the label of a position that has none.
        row_offset: added to row indices before asking `neighbours` (a slice of a bigger array).
    """

    def __init__(self, tokens: np.ndarray, seq_length: int, *, loss_mask: np.ndarray | None = None,
                 neighbours: NeighbourSource | None = None, pad_id: int = 0,
                 row_offset: int = 0):
        if tokens.ndim != 2 or tokens.shape[1] not in (seq_length, seq_length + 1):
            raise InputDataError(
                f"token rows have shape {tuple(tokens.shape)} but the trainer's seq_length is "
                f"{seq_length}: rows must hold seq_length or seq_length + 1 tokens; set "
                f"`seq_length` to the sequences' length")
        if loss_mask is not None and loss_mask.shape != tokens.shape:
            raise InputDataError(f"loss mask shape {loss_mask.shape} != tokens {tokens.shape}")
        self.tokens, self.seq_length, self.loss_mask = tokens, seq_length, loss_mask
        self.neighbours, self.pad_id, self.row_offset = neighbours, pad_id, row_offset

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, rows: np.ndarray) -> dict[str, Any]:
        """Tensors for `rows`: input_ids, labels [b, n] int64; loss_mask [b, n] float32;
        neighbours [b, l, k, r] int64 when the split has a neighbour source."""
        import torch

        order = np.argsort(rows, kind="stable")          # memmaps read faster in order
        inverse = np.argsort(order)
        toks = np.asarray(self.tokens[rows[order]], dtype=np.int64)[inverse]
        mask = (np.ones(toks.shape, dtype=np.float32) if self.loss_mask is None
                else np.asarray(self.loss_mask[rows[order]], dtype=np.float32)[inverse])
        n = self.seq_length
        if toks.shape[1] == n + 1:
            inputs, labels, lmask = toks[:, :n], toks[:, 1:], mask[:, 1:]
        else:  # shift inside the row; the last position predicts nothing
            inputs = toks
            labels = np.concatenate([toks[:, 1:], np.full((len(rows), 1), self.pad_id)], axis=1)
            lmask = np.concatenate([mask[:, 1:], np.zeros((len(rows), 1), np.float32)], axis=1)
        out = {"input_ids": torch.from_numpy(np.ascontiguousarray(inputs)),
               "labels": torch.from_numpy(np.ascontiguousarray(labels)),
               "loss_mask": torch.from_numpy(np.ascontiguousarray(lmask))}
        if self.neighbours is not None:
            out["neighbours"] = torch.from_numpy(
                np.ascontiguousarray(self.neighbours.tokens(rows + self.row_offset), dtype=np.int64))
        return out


@dataclass(frozen=True)
class ArrayNeighbours:
    """Neighbour tokens precomputed as one array [N, chunks, k, r] (tests, small data)."""

    array: np.ndarray

    def tokens(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.array[rows])


@dataclass(frozen=True)
class NpyRows:
    """A picklable recipe for a `TokenRows` over .npy files (opened as memmaps in the worker).

    Attributes:
        tokens: path of an int .npy [N, W].
        seq_length: model input length.
        loss_mask: optional path of a 0/1 .npy shaped like tokens.
        rows: optional (start, stop) slice of rows.
        neighbours: optional zero-argument callable building a NeighbourSource in the worker.
        pad_id: label id of positions with no label.
    """

    tokens: str
    seq_length: int
    loss_mask: Optional[str] = None
    rows: Optional[tuple[int, int]] = None
    neighbours: Optional[Callable[[], NeighbourSource]] = None
    pad_id: int = 0

    def __call__(self) -> TokenRows:
        tokens = np.load(self.tokens, mmap_mode="r")
        mask = np.load(self.loss_mask, mmap_mode="r") if self.loss_mask else None
        start = 0
        if self.rows is not None:
            start, stop = self.rows
            tokens = tokens[start:stop]
            mask = mask[start:stop] if mask is not None else None
        return TokenRows(tokens, self.seq_length, loss_mask=mask,
                         neighbours=self.neighbours() if self.neighbours else None,
                         pad_id=self.pad_id, row_offset=start)
