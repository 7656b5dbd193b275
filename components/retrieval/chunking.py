"""The `chunk-db` stage and `ChunkDB`, the reader every consumer of the retrieval DB uses.

Chunks are consecutive, non-overlapping `chunk_length` token windows that never cross a
document, so a document's last chunk has 1..chunk_length tokens (Megatron `db/build.py`).
Documents are split into train / valid / heldout / db by a seeded permutation; only train and
db (`split.db_only`: DB, never training) documents enter the DB, so DB row i is chunk i of
`chunks.npy`.

Continuation (departure from Megatron): a neighbour is returned with its *continuation*, the next
chunk of the same document, padded when the neighbour is the document's last chunk. Megatron
takes the next row of the merged DB (`id + 1` modulo the DB size), which at a document end is
the first chunk of an unrelated document and for the last row wraps to row 0 (REFERENCE.md §2.6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from retro.components.corpora.splits import SPLITS, SplitConfig, assign_splits, \
    in_db  # noqa: F401 (API)
from retro.components.retrieval.common import artifact_path, read_meta, write_meta
from retro.platform.stage import StageContext, StageParams, stage
from retro.platform.store import open_memmap

_DOC_BLOCK = 1 << 16


class ChunkDbParams(StageParams):
    chunk_length: int
    """Tokens per chunk (RETRO: 64)."""
    split: SplitConfig
    """How documents are assigned to train / valid / heldout."""


@stage("chunk-db", version="2", params=ChunkDbParams,
       inputs={"tokens": "tokenized documents (tokenize)"},
       estimate=lambda p: {"chunk_length": p.chunk_length})
def chunk_db(ctx: StageContext[ChunkDbParams]) -> dict:
    """Cut the DB documents (train and db_only) into chunks and record every document's split.

    Params: `chunk_length` (int), `split` (SplitConfig). Inputs: `tokens`.
    Files: `chunks.npy` int64 [n_chunks, 3] = (document index, start token offset in
    tokens.npy, length); `doc_split.npy` uint8 [n_docs]; `meta.json`.
    """
    length, split = ctx.params.chunk_length, ctx.params.split
    tokens_dir = ctx.inputs["tokens"].path
    offsets = np.load(tokens_dir / "doc_offsets.npy")
    n_docs = len(offsets) - 1
    doc_split = assign_splits(n_docs, split)
    np.save(ctx.out_dir / "doc_split.npy", doc_split)
    per_doc = -(-np.diff(offsets) // length)  # ceil
    per_doc[~in_db(doc_split)] = 0
    n_chunks = int(per_doc.sum())
    table = open_memmap(ctx.out_dir / "chunks.npy", np.int64, (n_chunks, 3), mode="w+")
    row = 0
    for a in range(0, n_docs, _DOC_BLOCK):
        block = _chunk_rows(offsets, per_doc, a, min(a + _DOC_BLOCK, n_docs), length)
        table[row:row + len(block)] = block
        row += len(block)
    table.flush()
    meta = {"chunk_length": length, "n_chunks": n_chunks, "n_docs": n_docs,
            **{f"{name}_docs": int((doc_split == code).sum()) for name, code in SPLITS.items()},
            **{f"{name}_tokens": int(np.diff(offsets)[doc_split == code].sum())
               for name, code in SPLITS.items()}}
    write_meta(ctx.out_dir, **meta)
    full = float((table[:, 2] == length).mean()) if n_chunks else 0.0
    return {**meta, "full_chunk_fraction": full}


def _chunk_rows(offsets: np.ndarray, per_doc: np.ndarray, a: int, b: int,
                length: int) -> np.ndarray:
    counts = per_doc[a:b]
    docs = np.repeat(np.arange(a, b, dtype=np.int64), counts)
    first = np.cumsum(counts) - counts
    pos = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first, counts)
    start = offsets[docs] + pos * length
    size = np.minimum(length, offsets[docs + 1] - start)
    return np.stack([docs, start, size], axis=1)



class ChunkDB:
    """Read access to the retrieval DB: chunk tokens, neighbours with continuations, text.

    Args:
        chunk_db_artifact_path: the `chunk-db` artifact (or its folder).
        tokens_artifact_path: the `tokenize` artifact it was built from.
    """

    def __init__(self, chunk_db_artifact_path: Any, tokens_artifact_path: Any):
        self.path = artifact_path(chunk_db_artifact_path)
        self.tokens_path = artifact_path(tokens_artifact_path)
        meta, tmeta = read_meta(self.path), read_meta(self.tokens_path)
        self.chunk_length: int = meta["chunk_length"]
        self.pad_id: int = tmeta["eod_id"]
        self.chunks = open_memmap(self.path / "chunks.npy")
        self.tokens = open_memmap(self.tokens_path / "tokens.npy")
        self._docs: Optional[list[dict]] = None

    @property
    def n_chunks(self) -> int:
        return len(self.chunks)

    def doc_of(self, ids: np.ndarray) -> np.ndarray:
        """Document index of each chunk id; -1 where the id is -1."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.full(ids.shape, -1, dtype=np.int64)
        ok = ids >= 0
        out[ok] = self.chunks[ids[ok], 0]
        return out

    def continuation(self, ids: np.ndarray) -> np.ndarray:
        """Next chunk of the same document, or -1 (document end, or id -1)."""
        ids = np.asarray(ids, dtype=np.int64)
        nxt = np.where((ids >= 0) & (ids + 1 < self.n_chunks), ids + 1, -1)
        same = self.doc_of(nxt) == self.doc_of(ids)
        return np.where((nxt >= 0) & same, nxt, -1)

    def chunk_tokens(self, ids: np.ndarray) -> np.ndarray:
        """Tokens of each chunk, right-padded with the pad (EOD) id: [..., chunk_length].
        An id of -1 gives a row of padding."""
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        out = np.full((len(flat), self.chunk_length), self.pad_id, dtype=np.int64)
        ok = np.flatnonzero(flat >= 0)
        if len(ok):
            rows = self.chunks[flat[ok]]
            pos = np.arange(self.chunk_length)
            idx = rows[:, 1:2] + pos                         # [m, L] token offsets
            valid = pos < rows[:, 2:3]
            gathered = self.tokens[np.where(valid, idx, rows[:, 1:2])].astype(np.int64)
            out[ok] = np.where(valid, gathered, self.pad_id)
        return out.reshape(*ids.shape, self.chunk_length)

    def neighbour_tokens(self, ids: np.ndarray) -> np.ndarray:
        """Each neighbour followed by its continuation: [..., k] -> [..., k, 2 * chunk_length].

        -1 ids (no neighbour) become rows of padding; a neighbour at a document end gets a
        padded continuation.
        """
        ids = np.asarray(ids, dtype=np.int64)
        return np.concatenate([self.chunk_tokens(ids), self.chunk_tokens(self.continuation(ids))],
                              axis=-1)

    def chunk_text(self, i: int, tokenizer: Any) -> str:
        """Decoded text of chunk `i` with the decoder tokenizer."""
        row = self.chunks[int(i)]
        return tokenizer.decode(self.tokens[row[1]:row[1] + row[2]].tolist(),
                                skip_special_tokens=True)

    def texts(self, start: int, stop: int, tokenizer: Any) -> list[str]:
        """Decoded texts of chunks [start, stop) (a `tokenizers.Tokenizer` or HF tokenizer)."""
        rows = self.chunks[start:stop]
        seqs = [self.tokens[s:s + n].tolist() for _, s, n in rows]
        return decode_batch(tokenizer, seqs)

    def doc_table(self) -> list[dict]:
        """`{"id", "title"}` of every document (read once, on first use)."""
        if self._docs is None:
            import json

            with open(self.tokens_path / "docs.jsonl") as fh:
                self._docs = [json.loads(line) for line in fh]
        return self._docs


def decode_batch(tokenizer: Any, seqs: list[list[int]]) -> list[str]:
    """Decode many id lists, skipping special tokens (EOD), with either tokenizer flavour."""
    if hasattr(tokenizer, "batch_decode"):
        return tokenizer.batch_decode(seqs, skip_special_tokens=True)
    return tokenizer.decode_batch(seqs, skip_special_tokens=True)


def raw_tokenizer(tokenizer_artifact: Any):
    """The fast `tokenizers.Tokenizer` of a tokenizer artifact (cheap to load in workers)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(artifact_path(tokenizer_artifact)) / "tokenizer.json"))
