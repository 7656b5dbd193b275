"""`retriever.split.db_only`: a retrieval DB larger than the LM's training split that still
never holds an evaluated document (issue 16 part 5).

A synthetic corpus of twin documents (document 2i+1 is a copy of document 2i) makes BM25 want
to return a document's own chunks and its twin's: the stages must keep valid / heldout
documents out of the DB, db_only documents out of the training sequences, and every document of
a sequence out of its neighbours, while the db_only twins of valid documents are found.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from retro.components.corpora.splits import SPLITS, SplitConfig, assign_splits
from retro.components.retrieval.bm25 import bm25_index
from retro.components.retrieval.chunking import ChunkDB, chunk_db
from retro.components.retrieval.common import write_meta
from retro.components.retrieval.neighbours import Neighbours, neighbours
from retro.components.retrieval.sequences import Sequences, sequences
from tests.retrieval.helpers import stage_ctx

N_DOCS, DOC_LEN, CHUNK, VOCAB = 40, 24, 8, 3000
EOD = VOCAB
SPLIT = {"valid": 0.2, "heldout": 0.05, "db_only": 0.5, "seed": 5}


@pytest.fixture
def artifacts(tmp_path):
    """tokenize + tokenizer artifacts for twin documents of random words `w<id>`."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    rng = np.random.default_rng(0)
    docs = []
    for _ in range(N_DOCS // 2):
        doc = rng.integers(0, VOCAB, DOC_LEN)
        docs += [doc, doc.copy()]
    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    vocab = {f"w{i}": i for i in range(VOCAB)} | {"<eod>": EOD}
    tok = Tokenizer(WordLevel(vocab, unk_token="<eod>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(["<eod>"])
    tok.save(str(tok_dir / "tokenizer.json"))
    write_meta(tok_dir, eod_id=EOD, vocab_size=VOCAB + 1)
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    np.save(tokens / "tokens.npy", np.concatenate(docs).astype(np.uint16))
    np.save(tokens / "doc_offsets.npy", np.arange(N_DOCS + 1, dtype=np.int64) * DOC_LEN)
    (tokens / "docs.jsonl").write_text("".join(json.dumps({"id": str(i), "title": ""}) + "\n"
                                               for i in range(N_DOCS)))
    write_meta(tokens, n_docs=N_DOCS, n_tokens=N_DOCS * DOC_LEN, dtype="uint16", eod_id=EOD,
               vocab_size=VOCAB + 1)
    return tmp_path, tok_dir, tokens


def _pipeline(tmp, tok_dir, tokens, split):
    cdb = stage_ctx(tmp, "chunk-db", {"chunk_length": CHUNK, "split": split}, {"tokens": tokens})
    chunk_db(cdb)
    bm25 = stage_ctx(tmp, "bm25", {"method": "lucene", "k1": 1.5, "b": 0.75, "stopwords": None},
                     {"chunk_db": cdb.out_dir, "tokens": tokens, "tokenizer": tok_dir})
    bm25_index(bm25)
    out = {"chunk_db": cdb.out_dir}
    for name in ("train", "valid"):
        seq = stage_ctx(tmp, f"seq-{name}", {"seq_length": 2 * CHUNK, "split": name},
                        {"tokens": tokens, "chunk_db": cdb.out_dir})
        sequences(seq)
        nbr = stage_ctx(tmp, f"nbr-{name}",
                        {"neighbours": {"candidates": 20, "k": 2},
                         "retriever": {"type": "bm25", "stopwords": None}},
                        {"sequences": seq.out_dir, "chunk_db": cdb.out_dir, "tokens": tokens,
                         "tokenizer": tok_dir, "bm25": bm25.out_dir})
        neighbours(nbr)
        out[name] = (Sequences(seq.out_dir), Neighbours(nbr.out_dir))
    return out


def test_db_only_documents_are_searched_but_never_trained_on_and_never_evaluated(artifacts):
    tmp, tok_dir, tokens = artifacts
    out = _pipeline(tmp, tok_dir, tokens, SPLIT)
    split = np.load(out["chunk_db"] / "doc_split.npy")
    assert np.bincount(split, minlength=4).tolist() == [10, 8, 2, 20]  # 40 x (.25, .2, .05, .5)
    db = ChunkDB(out["chunk_db"], tokens)
    in_db = set(np.unique(db.chunks[:, 0]).tolist())
    assert in_db == set(np.flatnonzero((split == SPLITS["train"]) | (split == SPLITS["db"])))
    train_seqs, train_nbrs = out["train"]
    trained = {int(d) for i in range(len(train_seqs)) for d in train_seqs.docs(i)}
    assert trained == set(np.flatnonzero(split == SPLITS["train"]).tolist())
    valid_seqs, valid_nbrs = out["valid"]
    evaluated = set(np.flatnonzero(split == SPLITS["valid"]).tolist())
    assert {int(d) for i in range(len(valid_seqs)) for d in valid_seqs.docs(i)} <= evaluated
    twin_found = 0
    for seqs, nbrs in (out["train"], out["valid"]):
        for i in range(len(seqs)):
            found = db.doc_of(nbrs.ids[i])
            found = found[found >= 0]
            assert not np.isin(found, seqs.docs(i)).any(), (seqs.split, i)  # own documents
            assert not set(found.tolist()) & evaluated, (seqs.split, i)     # the eval split
            if seqs.split == "valid":
                twins = {int(d) ^ 1 for d in seqs.docs(i)}
                twin_found += bool(set(found.tolist()) & twins & in_db)
    # the copy of a valid document sitting in the DB (a near-duplicate, not the document) is
    # what BM25 returns: the db_only documents really are searchable
    assert twin_found >= len(valid_seqs) // 2


def test_db_only_never_changes_the_evaluated_documents_or_old_keys():
    base = SplitConfig(valid=0.1, heldout=0.05, seed=3)
    more = SplitConfig(valid=0.1, heldout=0.05, seed=3, db_only=0.6)
    a, b = assign_splits(500, base), assign_splits(500, more)
    for name in ("valid", "heldout"):
        assert (np.flatnonzero(a == SPLITS[name]) == np.flatnonzero(b == SPLITS[name])).all()
    assert (b == SPLITS["db"]).sum() == 300 and (b == SPLITS["train"]).sum() == 425 - 300
    assert not (a == SPLITS["db"]).any()
    # stage keys hash the dumped params: db_only 0 dumps exactly as before the field existed
    assert base.model_dump(mode="json") == {"valid": 0.1, "heldout": 0.05, "seed": 3}
    assert more.model_dump(mode="json")["db_only"] == 0.6
    with pytest.raises(ValueError, match="db_only"):
        SplitConfig(valid=0.3, heldout=0.1, db_only=0.6)
