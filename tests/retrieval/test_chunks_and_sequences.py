"""chunk-db and sequences stages on synthetic token artifacts, checked against naive loops."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retro.components.retrieval.chunking import ChunkDB, SplitConfig, assign_splits, chunk_db
from retro.components.retrieval.common import shard_ranges, write_meta
from retro.components.retrieval.sequences import Sequences, sequences
from retro.platform.errors import UserError
from tests.retrieval.helpers import stage_ctx

EOD = 999


@pytest.fixture
def tokens_dir(tmp_path):
    """Ten documents of lengths 1..150; token value = 1000 * doc + position."""
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 150, size=10)
    lens[3] = 64  # one exactly chunk-sized
    toks = np.concatenate([1000 * (d + 1) + np.arange(n) for d, n in enumerate(lens)])
    d = tmp_path / "tokens"
    d.mkdir()
    np.save(d / "tokens.npy", toks.astype(np.uint32))
    np.save(d / "doc_offsets.npy", np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))
    (d / "docs.jsonl").write_text("".join(json.dumps({"id": str(i), "title": ""}) + "\n"
                                          for i in range(10)))
    write_meta(d, n_docs=10, n_tokens=int(lens.sum()), dtype="uint32", eod_id=EOD,
               vocab_size=1 << 20)
    return d


def _chunk(tmp_path, tokens_dir, split=None):
    split = split or {"valid": 0.2, "heldout": 0.1, "seed": 3}
    ctx = stage_ctx(tmp_path, "chunk-db", {"chunk_length": 64, "split": split},
                    {"tokens": tokens_dir})
    chunk_db(ctx)
    return ctx.out_dir


def test_chunks_cover_train_documents_and_never_cross_them(tmp_path, tokens_dir):
    out = _chunk(tmp_path, tokens_dir)
    offsets = np.load(tokens_dir / "doc_offsets.npy")
    split = np.load(out / "doc_split.npy")
    assert (split == 1).sum() == 2 and (split == 2).sum() == 1
    expected = [(d, s, min(64, offsets[d + 1] - s)) for d in np.flatnonzero(split == 0)
                for s in range(offsets[d], offsets[d + 1], 64)]
    assert np.load(out / "chunks.npy").tolist() == [list(map(int, r)) for r in expected]


def test_chunk_db_reader_pads_and_continues_within_the_document(tmp_path, tokens_dir):
    db = ChunkDB(_chunk(tmp_path, tokens_dir), tokens_dir)
    toks = np.load(tokens_dir / "tokens.npy")
    got = db.neighbour_tokens(np.arange(db.n_chunks)[:, None])       # [n, 1, 128]
    assert got.shape == (db.n_chunks, 1, 128)
    for i, (d, s, n) in enumerate(db.chunks):
        assert got[i, 0, :n].tolist() == toks[s:s + n].tolist()
        assert (got[i, 0, n:64] == EOD).all()
        nxt = i + 1 < db.n_chunks and db.chunks[i + 1][0] == d
        cont = got[i, 0, 64:]
        if nxt:
            s2, n2 = db.chunks[i + 1][1:]
            assert cont[:n2].tolist() == toks[s2:s2 + n2].tolist()
        else:  # document end: continuation is padding, never the next document
            assert (cont == EOD).all()
    assert (db.neighbour_tokens(np.array([[-1, 0]]))[0, 0] == EOD).all()
    assert db.doc_of(np.array([-1, 0])).tolist() == [-1, db.chunks[0][0]]


@pytest.mark.parametrize("split_name,code", [("train", 0), ("valid", 1)])
def test_sequences_concatenate_documents_with_eod_and_record_their_docs(
        tmp_path, tokens_dir, split_name, code):
    cdb = _chunk(tmp_path, tokens_dir)
    ctx = stage_ctx(tmp_path, f"seq-{split_name}", {"seq_length": 48, "split": split_name},
                    {"tokens": tokens_dir, "chunk_db": cdb})
    sequences(ctx)
    seqs = Sequences(ctx.out_dir)
    toks = np.load(tokens_dir / "tokens.npy")
    offsets = np.load(tokens_dir / "doc_offsets.npy")
    docs = np.flatnonzero(np.load(cdb / "doc_split.npy") == code)
    stream, owner = [], []
    for d in docs:
        stream += toks[offsets[d]:offsets[d + 1]].tolist() + [EOD]
        owner += [d] * (offsets[d + 1] - offsets[d] + 1)
    n = len(stream) // 48
    assert seqs.tokens.shape == (n, 48)
    assert seqs.tokens.reshape(-1).tolist() == stream[:n * 48]
    for i in range(n):
        assert seqs.docs(i).tolist() == sorted(set(owner[i * 48:(i + 1) * 48]))


def test_sequences_error_when_the_split_is_too_small(tmp_path, tokens_dir):
    cdb = _chunk(tmp_path, tokens_dir)
    ctx = stage_ctx(tmp_path, "seq", {"seq_length": 100_000, "split": "valid"},
                    {"tokens": tokens_dir, "chunk_db": cdb})
    with pytest.raises(UserError, match="fewer than seq_length=100000"):
        sequences(ctx)


def test_split_is_seeded_and_keeps_training_documents():
    a = assign_splits(1000, SplitConfig(valid=0.1, heldout=0.05, seed=1))
    assert (a == 1).sum() == 100 and (a == 2).sum() == 50
    assert (a == assign_splits(1000, SplitConfig(valid=0.1, heldout=0.05, seed=1))).all()
    assert (a != assign_splits(1000, SplitConfig(valid=0.1, heldout=0.05, seed=2))).any()
    with pytest.raises(UserError, match="keep one for training"):
        assign_splits(2, SplitConfig(valid=0.5, heldout=0.4))


def test_shard_ranges_are_window_aligned_and_cover():
    for n, shards, window in [(1000, 4, 64), (10, 4, 64), (513, 3, 1), (0, 2, 8)]:
        ranges = shard_ranges(n, shards, window)
        assert sum(b - a for a, b in ranges) == n
        assert all(a % window == 0 for a, _ in ranges)
        assert all(r1[1] == r2[0] for r1, r2 in zip(ranges, ranges[1:]))
