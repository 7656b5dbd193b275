"""Tiny real models and a small real corpus for the RA-DIT tests.

- a random 2-layer Llama (32 wide) with the GPT-2 BPE, saved with `save_pretrained` (the LM);
- a random 2-layer BERT (32 wide) with MiniLM's WordPiece tokenizer (the dual encoder);
- the first passages of nq_open_oracle's gold passages (real Wikipedia text) and its questions.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import yaml

ORACLE = "nq_open_oracle"


def tiny_lm(out: Path, seed: int = 0) -> Path:
    """A random tiny Llama + GPT-2 tokenizer (eos = <|endoftext|>) in `out`."""
    import torch
    from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

    from tests.conftest import SHARED_DATA

    tok = GPT2TokenizerFast.from_pretrained(str(SHARED_DATA / "tokenizer_gpt2"))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def tiny_bert(out: Path, seed: int = 0) -> Path:
    """A random tiny BERT encoder + MiniLM's uncased WordPiece tokenizer in `out`."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from retro.components.retrieval.embedders import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def oracle_corpus(shared: Path, out: Path, n: int) -> Path:
    """The first `n` gold passages as a jsonl corpus (one document each)."""
    with gzip.open(shared / ORACLE / "gold_passages.jsonl.gz", "rt") as fh:
        rows = [json.loads(line) for _, line in zip(range(n), fh)]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def oracle_questions(shared: Path, out: Path, n: int) -> Path:
    """The first `n` oracle questions as a qa-pairs jsonl file."""
    with gzip.open(shared / ORACLE / "questions.jsonl.gz", "rt") as fh:
        rows = [json.loads(line) for _, line in zip(range(n), fh)]
    out.write_text("".join(json.dumps({k: r[k] for k in ("id", "question", "answers")}) + "\n"
                           for r in rows))
    return out


def db_spec(tmp: Path, shared: Path, encoder: Path, n_passages: int = 40) -> Path:
    """A `retro-db` spec (no training splits): oracle passages, GPT-2 BPE, 32-token chunks,
    the tiny BERT as embedder, faiss Flat."""
    spec = {"name": "radit-db", "recipe": {"type": "retro-db", "seq_length": 64, "splits": []},
            "corpus": {"type": "jsonl", "doc_id_field": None, "prepend_title": True,
                       "paths": [str(oracle_corpus(shared, tmp / "corpus.jsonl", n_passages))]},
            "tokenizer": {"type": "gpt2-files", "path": str(shared / "tokenizer_gpt2")},
            "retriever": {"type": "dense", "chunk_length": 32,
                          "split": {"valid": 0.0, "heldout": 0.0},
                          "embedder": {"type": "hf-mean-pool", "model": str(encoder),
                                       "batch_size": 16},
                          "index": {"type": "faiss", "factory": "Flat"}},
            "tracking": "none",
            "store": {"path": str(tmp / "store"), "runs": str(tmp / "runs")}}
    path = tmp / "radit-db.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sha256_tree(path: Path) -> dict[str, str]:
    """relative file path -> sha256, for every file under `path` (or the file itself)."""
    import hashlib

    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path.parent if path.is_file() else path)):
            hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
