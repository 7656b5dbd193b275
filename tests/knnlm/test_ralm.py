"""In-context RALM (Ram et al. 2023) on a constructed case: token ids are unique positions,
the search returns the evaluated document's own future text first, the LM is recorded."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from retro.components.knnlm.config import InContextRalmEvaluator
from retro.components.knnlm.ralm import Hit, RalmScorer, blocks, fit_context

N, BASE = 40, 1000          # token at position p is BASE + p
EVALUATED, OTHER = 7, 3     # document ids


def _case(**cfg):
    toks = [BASE + p for p in range(N)]
    queries, calls = [], []

    def search(qs, n):
        out = []
        for q in qs:
            queries.append(list(q))
            end = max(q) - BASE + 1                   # the query's last position + 1
            future = tuple(toks[end:end + 8])         # the evaluated doc's next tokens
            out.append([Hit(future, EVALUATED, 9.0), Hit((5, 6, 7), OTHER, 2.0),
                        Hit((8, 9), OTHER + 1, 1.0)][:n])
        return out

    def score(inputs, firsts, targets):
        calls.extend(zip(inputs, firsts, targets))
        return [np.full(len(t), math.log(0.5)) for t in targets]

    c = InContextRalmEvaluator.Config(**{"stride": 4, "query_length": 6, **cfg})
    scorer = RalmScorer(c, search, score)
    logp = scorer.sequence_log_probs(toks, np.array([EVALUATED]))
    return toks, scorer, logp, queries, calls


def test_queries_end_before_the_first_predicted_token_and_the_evaluated_doc_is_dropped():
    toks, scorer, logp, queries, calls = _case()
    assert logp.shape == (N - 1,) and np.allclose(logp, math.log(0.5))
    assert blocks(N, 4)[0] == (1, 4)
    for block in scorer.trace:
        lo = block["lo"]
        positions = [t - BASE for t in block["query"]]
        assert positions == list(range(max(0, lo - 6), lo))   # the last 6 tokens before lo
        assert max(positions) < lo                             # never at/after a target
        assert block["docs"] == [OTHER] and block["dropped"] == 1
    # the LM never sees the evaluated document's retrieved text; every block is scored
    for inputs, first, targets in calls:
        lo = targets[0] - BASE
        assert inputs[first] == toks[lo - 1]                   # predicts toks[lo]
        assert set(inputs) & set(range(BASE, BASE + N)) <= set(toks[:targets[-1] - BASE])
    with_doc = [c for c in calls if c[0][:3] == [5, 6, 7]]
    assert len(with_doc) == len(scorer.trace) == len(blocks(N, 4)) - 1
    # the first block (no prefix to query with) is scored without retrieval
    assert calls[0][0] == toks[0:3] and calls[0][2] == toks[1:4]
    assert scorer.forward_tokens == sum(len(c[0]) for c in calls)
    assert scorer.queries == len(blocks(N, 4)) - 1


def test_doc_and_prefix_fit_the_baseline_budget():
    toks = list(range(100, 140))
    ids, first = fit_context(toks, 32, 36, list(range(20)), budget=39)
    assert len(ids) <= 39 and ids[:20] == list(range(20))
    assert ids[first] == toks[31] and ids[-1] == toks[34]
    # a long document is cut so that the stride's context still fits
    ids, first = fit_context(toks, 32, 36, list(range(100)), budget=39)
    assert len(ids) == 39 and ids[first] == toks[31]


def test_replug_ensemble_weights_documents_by_retrieval_score():
    toks = [BASE + p for p in range(12)]
    probs = {(5, 6, 7): 0.8, (8, 9): 0.2}

    def search(qs, n):
        return [[Hit((5, 6, 7), OTHER, 2.0), Hit((8, 9), OTHER + 1, 1.0)] for _ in qs]

    def score(inputs, firsts, targets):
        return [np.full(len(t), math.log(probs.get(tuple(i[:3]), probs.get(tuple(i[:2]), 0.5))))
                for i, t in zip(inputs, targets)]

    cfg = InContextRalmEvaluator.Config(stride=4, query_length=4, docs=2, ensemble=True)
    logp = RalmScorer(cfg, search, score).sequence_log_probs(toks, np.array([EVALUATED]))
    w = np.exp([2.0, 1.0]) / np.exp([2.0, 1.0]).sum()
    assert math.exp(logp[-1]) == pytest.approx(w[0] * 0.8 + w[1] * 0.2, rel=1e-12)
    assert math.exp(logp[0]) == pytest.approx(0.5)           # block 0: no retrieval
    with pytest.raises(ValueError, match="ensemble"):
        InContextRalmEvaluator.Config(docs=2)


def test_the_retriever_adapter_maps_chunks_to_documents_and_drops_the_evaluated_one(tmp_path):
    """`retriever_search` over the platform's Retriever (a searcher that ranks the evaluated
    document's chunk first): hits carry the chunk's corpus document and tokens; the scorer
    drops the evaluated document's chunk."""
    from transformers import GPT2TokenizerFast

    from retro.components.knnlm.ralm import retriever_search
    from retro.components.retrieval.api import ChunkDB, Retriever, Sequences
    from tests.conftest import SHARED_DATA
    from tests.knnlm.helpers import db_artifacts

    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    docs = [list(range(200, 240)), list(range(300, 340)), list(range(400, 470))]
    arts = db_artifacts(tmp_path, docs, [0, 0, 1], 32)
    seqs = Sequences(arts["sequences-valid"])
    assert list(seqs.docs(0)) == [2]                       # the evaluated (valid) document

    class Searcher:                                        # BM25-like: text in, ids out
        texts: list[str] = []

        def search_texts(self, texts, n):
            self.texts += texts
            return (np.tile([[9.0, 5.0, 1.0]], (len(texts), 1))[:, :n],
                    np.tile([[2, 0, 1]], (len(texts), 1))[:, :n])

    tok = GPT2TokenizerFast.from_pretrained(str(SHARED_DATA / "tokenizer_gpt2"))
    searcher = Searcher()
    retriever = Retriever(searcher, ChunkDB(arts["chunk_db"], arts["tokens"]), tok)
    cfg = InContextRalmEvaluator.Config(stride=8, query_length=8, continuation=False,
                                        title=False)
    hits = retriever_search(retriever, cfg)([[400, 401]], 3)[0]
    assert [h.doc for h in hits] == [2, 0, 1]
    assert hits[1].tokens == tuple(docs[0]) and hits[1].score == 5.0
    assert searcher.texts == [tok.decode([400, 401])]
    prompts = []

    def score(inputs, firsts, targets):
        prompts.extend(inputs)
        return [np.zeros(len(t)) for t in targets]

    scorer = RalmScorer(cfg, retriever_search(retriever, cfg), score)
    scorer.sequence_log_probs(np.asarray(seqs.tokens[0]).tolist(), seqs.docs(0))
    assert all(b["docs"] == [0] and b["dropped"] == 1 for b in scorer.trace)
    assert not any(set(p) & set(docs[2][40:]) - set(np.asarray(seqs.tokens[0]).tolist())
                   for p in prompts)
    # with `title` (the paper's title + "\n" + text) the corpus title leads the document
    (arts["tokens"].path / "docs.jsonl").write_text("".join(
        json.dumps({"id": f"d{i}", "title": f"Title {i}"}) + "\n" for i in range(3)))
    titled = Retriever(searcher, ChunkDB(arts["chunk_db"], arts["tokens"]), tok)
    cfg = InContextRalmEvaluator.Config(stride=8, query_length=8, continuation=False,
                                        title=True, doc_tokens=44)
    hit = retriever_search(titled, cfg)([[400]], 2)[0][1]
    head = tok.encode("Title 0\n")
    assert hit.tokens == tuple(head + docs[0])[:44]
