"""The tokenizer stage for each tokenizer kind, and load_tokenizer."""

from __future__ import annotations

import json

import pytest

from retro.components.retrieval.embedders import default_model_path
from retro.components.tokenizers.stage import load_tokenizer, tokenizer_stage
from retro.platform.errors import InputDataError
from tests.retrieval.helpers import stage_ctx, write_jsonl


def _run(tmp_path, name, tokenizer, corpus=None):
    params = {"tokenizer": tokenizer, **({"corpus": corpus} if corpus else {})}
    ctx = stage_ctx(tmp_path, name, params, {})
    summary = tokenizer_stage(ctx)
    return summary, load_tokenizer(ctx.out_dir), json.loads((ctx.out_dir / "meta.json").read_text())


def test_gpt2_files(tmp_path, shared_data):
    summary, tok, meta = _run(tmp_path, "gpt2", {"type": "gpt2-files",
                                                 "path": str(shared_data / "tokenizer_gpt2")})
    assert summary == {"vocab_size": 50257, "eod_id": 50256} and meta["eod_id"] == 50256
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok.pad_token_id == tok.eos_token_id == 50256
    with pytest.raises(InputDataError, match="vocab.json does not exist"):
        _run(tmp_path, "missing", {"type": "gpt2-files", "path": str(tmp_path)})


def test_hf_dir_uses_eos_or_sep_as_eod(tmp_path):
    _, tok, meta = _run(tmp_path, "bert", {"type": "hf-dir", "path": default_model_path()})
    assert tok.eos_token == "[SEP]" and meta["eod_id"] == tok.sep_token_id == tok.pad_token_id
    with pytest.raises(InputDataError, match="is not a directory"):
        _run(tmp_path, "nodir", {"type": "hf-dir", "path": str(tmp_path / "nope")})
    with pytest.raises(InputDataError, match="'<eod>' is not in the tokenizer's vocabulary"):
        _run(tmp_path, "badeod", {"type": "hf-dir", "path": default_model_path(),
                                  "eod_token": "<eod>"})


def test_train_bpe_is_byte_level_and_round_trips(tmp_path):
    texts = [f"The {w} chemical element number {i} is rare." for i, w in
             enumerate(["astatine", "francium", "radon", "polonium"] * 20)]
    path = write_jsonl(tmp_path / "c.jsonl", [{"doc_id": str(i), "text": t}
                                              for i, t in enumerate(texts)])
    corpus = {"type": "jsonl", "paths": [str(path)]}
    _, tok, meta = _run(tmp_path, "bpe", {"type": "train-bpe", "vocab_size": 300}, corpus)
    assert len(tok) == meta["vocab_size"] <= 300 and tok.eos_token == "<|endoftext|>"
    text = "Astatine: ünïcödé 元素 is rare"  # unseen characters still round-trip (bytes)
    assert tok.decode(tok(text)["input_ids"]) == text
    _, tok2, _ = _run(tmp_path, "bpe2", {"type": "train-bpe", "vocab_size": 300}, corpus)
    assert tok2.get_vocab() == tok.get_vocab()  # deterministic for the same corpus


def test_train_bpe_learns_from_train_split_documents_only(tmp_path):
    """The tokenizer never sees validation / held-out text (issue 13 defect 12): trained with
    `retriever.split` it equals the tokenizer trained on the train documents alone, and a word
    only the validation documents use gets no merged token."""
    import numpy as np

    from retro.components.retrieval.chunking import SplitConfig, assign_splits

    split = {"valid": 0.25, "heldout": 0.1, "seed": 3}
    codes = assign_splits(20, SplitConfig.model_validate(split))
    assert (codes == 0).sum() == 13
    texts = [("quixotically zymurgy " * 30 if c else "") + f"The element number {i} is rare."
             for i, c in enumerate(codes)]
    rows = [{"doc_id": str(i), "text": t} for i, t in enumerate(texts)]
    corpus = {"type": "jsonl", "paths": [str(write_jsonl(tmp_path / "all.jsonl", rows))]}
    train_only = {"type": "jsonl", "paths": [str(write_jsonl(
        tmp_path / "train.jsonl", [r for r, c in zip(rows, codes) if c == 0]))]}
    node = {"type": "train-bpe", "vocab_size": 320}
    ctx = stage_ctx(tmp_path, "split", {"tokenizer": node, "corpus": corpus, "split": split}, {})
    tokenizer_stage(ctx)
    with_split = load_tokenizer(ctx.out_dir)
    _, alone, _ = _run(tmp_path, "alone", node, train_only)
    _, everything, _ = _run(tmp_path, "all", node, corpus)
    assert with_split.get_vocab() == alone.get_vocab()
    assert len(with_split(" zymurgy")["input_ids"]) > 3
    assert len(everything(" zymurgy")["input_ids"]) <= 2     # what leaking valid text does
    assert np.any(codes == 2)                                 # held-out docs were dropped too
