"""Tiny hand-built artifacts for the kNN-LM / in-context RALM stage tests (no Ray, no corpus
stages): a random 2-layer GPT-2 with the GPT-2 BPE, and the files `tokenize`, `chunk-db` and
`sequences` write, for documents given as token lists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.evaluation.helpers import as_artifact


def tiny_gpt2(out: Path, seed: int = 0) -> Path:
    """A random 2-layer GPT-2 (16 wide) + the GPT-2 tokenizer, saved in `out`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from tests.conftest import SHARED_DATA

    tok = GPT2TokenizerFast.from_pretrained(str(SHARED_DATA / "tokenizer_gpt2"))
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=2, n_head=2, n_positions=128,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def db_artifacts(tmp: Path, docs: list[list[int]], splits: list[int], seq_length: int,
                 eod: int = 50256) -> dict:
    """`tokens`, `chunk_db` (one chunk per document) and `sequences-<split>` artifacts of
    `docs` (split 0 train, 1 valid) as the stages lay them out."""
    tokens_dir, db_dir = tmp / "tokens", tmp / "chunk_db"
    tokens_dir.mkdir(parents=True)
    db_dir.mkdir()
    flat = np.concatenate([np.asarray(d, dtype=np.int32) for d in docs])
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    np.save(tokens_dir / "tokens.npy", flat)
    np.save(tokens_dir / "doc_offsets.npy", offsets)
    (tokens_dir / "meta.json").write_text(json.dumps({"dtype": "int32", "eod_id": eod}))
    (tokens_dir / "docs.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "title": ""})
                                                   + "\n" for i in range(len(docs))))
    np.save(db_dir / "doc_split.npy", np.asarray(splits, dtype=np.int8))
    chunks = np.array([[i, offsets[i], len(d)] for i, d in enumerate(docs)], dtype=np.int64)
    np.save(db_dir / "chunks.npy", chunks)
    (db_dir / "meta.json").write_text(json.dumps({"chunk_length": max(map(len, docs))}))
    out = {"tokens": as_artifact(tokens_dir, "tokenize"), "chunk_db": as_artifact(db_dir,
                                                                                   "chunk-db")}
    for name, code in (("train", 0), ("valid", 1)):
        ids = [i for i, s in enumerate(splits) if s == code]
        stream = np.concatenate([np.append(docs[i], eod) for i in ids]).astype(np.int32)
        n_seq = len(stream) // seq_length
        d = tmp / f"sequences-{name}"
        d.mkdir()
        np.save(d / "tokens.npy", stream[:n_seq * seq_length].reshape(n_seq, seq_length))
        starts = np.concatenate([[0], np.cumsum([len(docs[i]) + 1 for i in ids])])
        per = [[ids[j] for j in range(len(ids)) if starts[j] < (s + 1) * seq_length
                and starts[j + 1] > s * seq_length] for s in range(n_seq)]
        np.save(d / "seq_doc_offsets.npy", np.concatenate([[0], np.cumsum(list(map(len, per)))])
                .astype(np.int64))
        np.save(d / "seq_docs.npy", np.asarray(sum(per, []), dtype=np.int64))
        (d / "meta.json").write_text(json.dumps({"split": name, "seq_length": seq_length,
                                                 "n_seq": n_seq, "eod_id": eod}))
        out[f"sequences-{name}"] = as_artifact(d, "sequences")
    return out
