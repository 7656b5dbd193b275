"""The `sequences` stage and `Sequences`: fixed-length LM samples of one split.

The split's documents are concatenated in document order with an EOD token after each one, and
cut into `seq_length`-token sequences; the tail that does not fill a sequence is dropped. For
each sequence we record every document it touches (a document's trailing EOD counts as part of
it), which is what neighbour search excludes (Megatron `query/query.py`).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from retro.components.retrieval.chunking import SPLITS
from retro.components.retrieval.common import artifact_path, read_meta, write_meta
from retro.platform.errors import UserError
from retro.platform.stage import StageContext, StageParams, stage
from retro.platform.store import open_memmap

_DOC_BLOCK = 1 << 16


class SequencesParams(StageParams):
    seq_length: int
    """Tokens per training sequence."""
    split: Literal["train", "valid", "heldout"]
    """Which documents' tokens the sequences hold."""


@stage("sequences", version="2", params=SequencesParams,
       inputs={"tokens": "tokenized documents (tokenize)",
               "chunk_db": "the documents' split (chunk-db)"},
       estimate=lambda p: {"split": p.split, "seq_length": p.seq_length})
def sequences(ctx: StageContext[SequencesParams]) -> dict:
    """Cut one split into training sequences.

    Params: `seq_length` (int), `split` (train/valid/heldout). Inputs: `tokens`, `chunk_db`.
    Files: `tokens.npy` [n_seq, seq_length] (dtype of the token memmap);
    `seq_doc_offsets.npy` int64 [n_seq + 1] and `seq_docs.npy` int64: the documents of
    sequence i are `seq_docs[seq_doc_offsets[i]:seq_doc_offsets[i + 1]]`; `meta.json`.
    """
    length, split = ctx.params.seq_length, ctx.params.split
    tokens_dir = ctx.inputs["tokens"].path
    tmeta = read_meta(tokens_dir)
    offsets = np.load(tokens_dir / "doc_offsets.npy")
    docs = np.flatnonzero(np.load(ctx.inputs["chunk_db"].path / "doc_split.npy") == SPLITS[split])
    spans = np.diff(offsets)[docs] + 1                       # each document plus its EOD
    starts = np.concatenate([[0], np.cumsum(spans)])          # stream position of each doc
    n_seq = int(starts[-1] // length)
    if n_seq == 0:
        raise UserError(f"split {split!r} has {int(starts[-1])} tokens, fewer than "
                        f"seq_length={length}: no sequence fits; use more documents, a larger "
                        "split fraction (retriever.split) or a shorter seq_length")
    out = open_memmap(ctx.out_dir / "tokens.npy", tmeta["dtype"], (n_seq, length), mode="w+")
    _fill(out.reshape(-1), open_memmap(tokens_dir / "tokens.npy"), offsets, docs, starts,
          tmeta["eod_id"])
    out.flush()
    seq_offsets, seq_docs = _docs_per_sequence(docs, starts, length, n_seq)
    np.save(ctx.out_dir / "seq_doc_offsets.npy", seq_offsets)
    np.save(ctx.out_dir / "seq_docs.npy", seq_docs)
    meta = {"split": split, "seq_length": length, "n_seq": n_seq, "n_docs": int(len(docs)),
            "dropped_tokens": int(starts[-1] - n_seq * length), "eod_id": tmeta["eod_id"]}
    write_meta(ctx.out_dir, **meta)
    return {**meta, "docs_per_seq": float(len(seq_docs) / n_seq)}


def _fill(flat: np.ndarray, tokens: np.ndarray, offsets: np.ndarray, docs: np.ndarray,
          starts: np.ndarray, eod: int) -> None:
    """Write doc tokens + EOD into the flat sequence buffer until it is full."""
    cap = len(flat)
    for d, s in zip(docs, starts[:-1]):
        if s >= cap:
            break
        a, b = offsets[d], offsets[d + 1]
        n = min(b - a, cap - s)
        flat[s:s + n] = tokens[a:a + n]
        if s + (b - a) < cap:
            flat[s + (b - a)] = eod


def _docs_per_sequence(docs: np.ndarray, starts: np.ndarray, length: int,
                       n_seq: int) -> tuple[np.ndarray, np.ndarray]:
    first = starts[:-1] // length
    last = np.minimum((starts[1:] - 1) // length, n_seq - 1)
    keep = first < n_seq
    docs, first, last = docs[keep], first[keep], last[keep]
    counts = last - first + 1
    seq = np.repeat(first, counts) + (np.arange(int(counts.sum()))
                                      - np.repeat(np.cumsum(counts) - counts, counts))
    doc = np.repeat(docs, counts)
    order = np.argsort(seq, kind="stable")  # already grouped by doc; regroup by sequence
    seq, doc = seq[order], doc[order]
    offsets = np.zeros(n_seq + 1, dtype=np.int64)
    np.cumsum(np.bincount(seq, minlength=n_seq), out=offsets[1:])
    return offsets, doc.astype(np.int64)



class Sequences:
    """Reader of a `sequences` artifact: `.tokens` [n_seq, seq_length] and `.docs(i)`."""

    def __init__(self, artifact_path_: Any):
        self.path = artifact_path(artifact_path_)
        meta = read_meta(self.path)
        self.split: str = meta["split"]
        self.seq_length: int = meta["seq_length"]
        self.eod_id: int = meta["eod_id"]
        self.tokens = open_memmap(self.path / "tokens.npy")
        self._offsets = np.load(self.path / "seq_doc_offsets.npy")
        self._docs = open_memmap(self.path / "seq_docs.npy")

    def __len__(self) -> int:
        return len(self.tokens)

    def docs(self, i: int) -> np.ndarray:
        """Document indices touched by sequence `i`."""
        return np.asarray(self._docs[self._offsets[i]:self._offsets[i + 1]])
