"""The retro-db recipe end to end through the platform on local Ray, on real Wikipedia passages.

Six featured articles (315 passages, about 500 GPT-2 chunks) are tokenized, chunked, embedded
with MiniLM, indexed and queried, once with 1 worker and once with 4 (separate stores), so the
same content keys are computed twice with different sharding.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from retro.platform.stage import StageCall
from retro.components.retrieval.api import ChunkDB, Neighbours, Retriever, Sequences, \
    load_tokenizer, retriever_inputs
from retro.components.retrieval.common import build_component
from retro.platform import api
from retro.platform.errors import SpecError, UserError
from retro.platform.store import ArtifactStore
from tests.retrieval.helpers import WIKI, wiki_records, write_jsonl, write_spec

pytestmark = pytest.mark.integration

N_DOCS = 6


def dense_sections(shared, **retriever):
    return {
        "recipe": {"type": "retro-db", "seq_length": 256},
        "corpus": {"type": "jsonl", "paths": [str(shared / WIKI)], "max_documents": N_DOCS},
        "tokenizer": {"type": "gpt2-files", "path": str(shared / "tokenizer_gpt2")},
        "retriever": {"type": "dense", "split": {"valid": 0.17, "heldout": 0.17, "seed": 1},
                      # small windows: the 4-worker run really gets 4 shards per stage
                      "embedder": {"type": "hf-mean-pool", "batch_size": 16, "sort_window": 2},
                      "index": {"type": "faiss", "factory": "Flat"},
                      "neighbours": {"candidates": 200, "k": 2},
                      "quality": {"probe_size": 100}, **retriever},
    }


def run(tmp, name, workers=1, **sections):
    spec = write_spec(tmp / f"{name}.yaml", tmp / name,
                      resources={"default": {"num_workers": workers}}, **sections)
    record, outcome, plan = api.run(spec)
    store = ArtifactStore(tmp / name / "store")
    arts = {call: store.get(plan.by_id(i).stage, plan.by_id(i).key)
            for call, i in plan.variants["main"].items() if store.exists(plan.by_id(i).stage,
                                                                         plan.by_id(i).key)}
    return outcome, arts


@pytest.fixture(scope="module")
def dense(ray_session, tmp_path_factory):
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("shared data missing")
    tmp = tmp_path_factory.mktemp("dense")
    one = run(tmp, "one", 1, **dense_sections(SHARED_DATA))
    four = run(tmp, "four", 4, **dense_sections(SHARED_DATA))
    return tmp, one, four


def test_every_stage_runs_and_artifacts_are_consistent(dense, shared_data):
    _, (outcome, arts), _ = dense
    assert outcome.ok, outcome.failures
    assert set(outcome.states.values()) == {"done"} and len(arts) == 11
    tok = load_tokenizer(arts["tokenizer"])
    assert tok.eos_token_id == tok.pad_token_id == 50256
    # tokens are the GPT-2 encoding of each article (passages joined with spaces)
    offsets = np.load(arts["tokenize"].file("doc_offsets.npy"))
    tokens = np.load(arts["tokenize"].file("tokens.npy"))
    records = wiki_records(shared_data, N_DOCS)
    first = " ".join(r["text"] for r in records if r["doc_id"] == records[0]["doc_id"])
    assert tokens[offsets[0]:offsets[1]].tolist() == tok(first)["input_ids"]
    docs = [json.loads(x) for x in arts["tokenize"].file("docs.jsonl").read_text().splitlines()]
    assert [d["id"] for d in docs] == list(dict.fromkeys(r["doc_id"] for r in records))
    # the DB holds exactly the train documents' chunks; embeddings are unit vectors
    db = ChunkDB(arts["chunk-db"], arts["tokenize"])
    split = np.load(arts["chunk-db"].file("doc_split.npy"))
    assert set(np.unique(db.chunks[:, 0])) == set(np.flatnonzero(split == 0))
    emb = np.load(arts["embed"].file("embeddings.npy"))
    assert emb.shape == (db.n_chunks, 384)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    quality = arts["retrieval-quality"].manifest["summary"]
    assert quality["recall@2"] == quality["recall@10"] == 1.0  # Flat is exact
    for split_name in ("train", "valid"):
        seqs = Sequences(arts[f"sequences-{split_name}"])
        nbrs = Neighbours(arts[f"neighbours-{split_name}"])
        assert nbrs.ids.shape == (len(seqs), 4, 2) and seqs.tokens.shape[1] == 256
        assert db.neighbour_tokens(nbrs.ids[:3]).shape == (3, 4, 2, 128)


def test_no_neighbour_comes_from_a_document_of_its_sequence(dense):
    _, (_, arts), _ = dense
    db = ChunkDB(arts["chunk-db"], arts["tokenize"])
    seqs, nbrs = Sequences(arts["sequences-train"]), Neighbours(arts["neighbours-train"])
    for i in range(len(seqs)):
        found = db.doc_of(nbrs.ids[i])
        assert not np.isin(found[found >= 0], seqs.docs(i)).any(), i
    summary = arts["neighbours-train"].manifest["summary"]
    assert summary["excluded_same_doc"] > 1  # the filter had same-document hits to drop
    assert summary["padded_fraction"] == 0.0  # 200 candidates always leave 2 neighbours


def test_neighbours_match_a_brute_force_search_with_exclusion(dense):
    import faiss

    _, (_, arts), _ = dense
    db = ChunkDB(arts["chunk-db"], arts["tokenize"])
    seqs, nbrs = Sequences(arts["sequences-train"]), Neighbours(arts["neighbours-train"])
    emb = np.load(arts["embed"].file("embeddings.npy"))
    embedder = build_component("embedder", {"type": "hf-mean-pool", "batch_size": 16,
                                            "sort_window": 2})
    tok = load_tokenizer(arts["tokenizer"])
    rows = [0, len(seqs) // 2, len(seqs) - 1]
    texts = [tok.decode(seqs.tokens[i][j * 64:(j + 1) * 64], skip_special_tokens=True)
             for i in rows for j in range(4)]
    scores, hits = faiss.knn(embedder.embed(texts), emb, len(emb),
                             metric=faiss.METRIC_INNER_PRODUCT)
    for q, (i, j) in enumerate((i, j) for i in rows for j in range(4)):
        allowed = [h for h in hits[q] if db.chunks[h, 0] not in seqs.docs(i)]
        assert nbrs.ids[i, j].tolist() == allowed[:2]


def test_results_do_not_depend_on_the_number_of_shards(dense):
    _, (_, one), (outcome, four) = dense
    assert outcome.ok, outcome.failures
    assert one["embed"].key == four["embed"].key  # resources never enter a key
    for call, name in [("tokenize", "tokens.npy"), ("tokenize", "doc_offsets.npy"),
                       ("chunk-db", "chunks.npy"), ("sequences-train", "tokens.npy"),
                       ("neighbours-train", "neighbours.npy"),
                       ("neighbours-valid", "neighbours.npy")]:
        assert np.array_equal(np.load(one[call].file(name)), np.load(four[call].file(name))), call
    assert np.allclose(np.load(one["embed"].file("embeddings.npy")),
                       np.load(four["embed"].file("embeddings.npy")), atol=1e-6)
    assert one["tokenize"].file("docs.jsonl").read_text() == \
        four["tokenize"].file("docs.jsonl").read_text()
    assert four["embed"].manifest["summary"]["n"] > 4 * 32  # 4 shards of >= 1 window each


def test_dense_retriever_answers_free_text(dense, shared_data):
    _, (_, arts), _ = dense
    node = dense_sections(shared_data)["retriever"]
    calls = [StageCall(name, name) for name in ("tokenizer", "tokenize", "chunk-db",
                                                 "fill-index")]
    inputs = {slot: arts[call.name] for slot, call in retriever_inputs(calls).items()}
    retriever = Retriever.from_artifacts(node, inputs)
    db = ChunkDB(arts["chunk-db"], arts["tokenize"])
    tok = load_tokenizer(arts["tokenizer"])
    doc = db.doc_table()[db.doc_of(np.array([7]))[0]]
    hits = retriever.search([db.chunk_text(7, tok), doc["title"]], k=3)
    assert hits[0][0].chunk_id == 7 and hits[0][0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[1][0].title == doc["title"] and hits[1][0].doc_id == doc["id"]
    assert len(hits[1]) == 3 and hits[1][0].score >= hits[1][1].score
    assert retriever.encode_queries(["x", "y"]).shape == (2, 384)
    swapped = retriever.with_query_encoder(lambda qs: retriever.encode_queries(qs)[:, ::-1])
    assert np.array_equal(swapped.encode_queries(["a"]), retriever.encode_queries(["a"])[:, ::-1])
    bad = retriever.with_query_encoder(lambda qs: np.zeros((len(qs), 768), np.float32))
    with pytest.raises(UserError, match="dims mismatch: query embeddings have shape"):
        bad.search(["anything"], 2)


def test_rerun_is_cached_and_min_recall_stops_the_run(dense, shared_data):
    tmp, _, _ = dense
    outcome, _ = run(tmp, "one", 1, **dense_sections(shared_data))
    assert set(outcome.states.values()) == {"cached"}
    sections = dense_sections(shared_data, index={"type": "faiss", "factory": "IVF8,PQ8x4",
                                                  "nprobe": 1},
                              quality={"probe_size": 100, "min_recall": 0.99})
    outcome, arts = run(tmp, "one", 1, **sections)
    states = {name.split("@")[0]: s for name, s in outcome.states.items()}
    assert states["embed"] == "cached" and states["fill-index"] == "done"
    assert states["retrieval-quality"] == "failed"
    assert "recall@2 = " in outcome.failures[0].cause
    assert "retriever.quality.min_recall = 0.99" in outcome.failures[0].cause


def test_bm25_retriever_with_a_trained_bpe_and_skipped_records(ray_session, tmp_path,
                                                               shared_data):
    records = wiki_records(shared_data, 4)  # two files: the scan counts them in parallel
    write_jsonl(tmp_path / "c1.jsonl", records[:90] + [b"\xff\xfe broken"])
    write_jsonl(tmp_path / "c2.jsonl", [{"doc_id": "x", "text": ""}] + records[90:])
    sections = {"recipe": {"type": "retro-db", "seq_length": 128},
                "corpus": {"type": "jsonl", "paths": [str(tmp_path / "c*.jsonl")],
                           "on_bad_record": "skip",
                           "on_empty": "skip"},
                "tokenizer": {"type": "train-bpe", "vocab_size": 1000},
                "retriever": {"type": "bm25", "split": {"valid": 0.25, "heldout": 0},
                              "neighbours": {"candidates": 100, "k": 3}}}
    outcome, arts = run(tmp_path, "bm25", 2, **sections)
    assert outcome.ok, outcome.failures
    assert "embed" not in arts and "bm25-index" in arts
    summary = arts["tokenize"].manifest["summary"]
    assert summary["skipped_bad_records"] == 1 and summary["skipped_empty_records"] == 1
    assert summary["n_docs"] == 4
    tok = load_tokenizer(arts["tokenizer"])
    assert len(tok) == 1000 and tok.eos_token == "<|endoftext|>" and tok.pad_token_id == \
        tok.eos_token_id
    db = ChunkDB(arts["chunk-db"], arts["tokenize"])
    seqs, nbrs = Sequences(arts["sequences-train"]), Neighbours(arts["neighbours-train"])
    assert nbrs.ids.shape == (len(seqs), 2, 3)
    for i in range(len(seqs)):
        found = db.doc_of(nbrs.ids[i])
        assert not np.isin(found[found >= 0], seqs.docs(i)).any()
    inputs = {"tokenizer": arts["tokenizer"], "tokens": arts["tokenize"],
              "chunk_db": arts["chunk-db"], "bm25": arts["bm25-index"]}
    retriever = Retriever.from_artifacts(sections["retriever"], inputs)
    assert retriever.search([db.chunk_text(3, tok)], 2)[0][0].chunk_id == 3
    with pytest.raises(UserError, match="no query encoder"):
        retriever.encode_queries(["q"])


@pytest.mark.parametrize("case,corpus_records,field,message", [
    ("utf8", [{"doc_id": "1", "text": "ok"}, b'{"doc_id": "2", "text": "\xe9"}'], "text",
     r"c\.jsonl:2: not valid UTF-8"),
    ("empty", [{"doc_id": "1", "text": "ok"}, {"doc_id": "2", "text": " "}], "text",
     r"c\.jsonl:2: empty document text"),
    ("field", [{"doc_id": "1", "text": "ok"}], "body", r"c\.jsonl:1: no field 'body'"),
    ("emptyfile", [], "text", r"c\.jsonl is empty"),
])
def test_bad_corpus_fails_at_tokenize_before_any_heavy_stage(ray_session, tmp_path,
                                                             shared_data, case,
                                                             corpus_records, field, message):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, corpus_records) if corpus_records else path.write_bytes(b"")
    sections = dense_sections(shared_data)
    sections["corpus"] = {"type": "jsonl", "paths": [str(path)], "text_field": field}
    outcome, _ = run(tmp_path, case, 1, **sections)
    states = {name.split("@")[0]: s for name, s in outcome.states.items()}
    assert states["tokenize"] == "failed" and states["embed"] == "blocked"
    assert outcome.failures[0].user_error
    import re

    assert re.search(message, outcome.failures[0].cause), outcome.failures[0].cause


def test_spec_errors_before_anything_runs(tmp_path, shared_data):
    def validate(**retriever):
        spec = write_spec(tmp_path / "s.yaml", tmp_path, **dense_sections(shared_data,
                                                                         **retriever))
        return api.validate(spec)

    with pytest.raises(SpecError, match="not a faiss index_factory string"):
        validate(index={"type": "faiss", "factory": "IVF16 Flat"})
    with pytest.raises(SpecError, match=r"factory 'IVF16,PQ7' is invalid for 384-d"):
        validate(index={"type": "faiss", "factory": "IVF16,PQ7"})
    with pytest.raises(SpecError, match="index.dim is 768 but the embeddings have dim 384"):
        validate(index={"type": "faiss", "dim": 768})
    missing = str(tmp_path / "no-encoder")
    spec = write_spec(tmp_path / "m.yaml", tmp_path, **dense_sections(
        shared_data, embedder={"type": "hf-mean-pool", "model": missing}))
    with pytest.raises(UserError, match=r"retriever.embedder.model: .*no-encoder does not exist"):
        api.run(spec)
    assert not (tmp_path / "runs").exists()  # nothing recorded, nothing ran


def test_neighbours_reusing_db_embeddings_equal_embedding_every_query_chunk(dense, tmp_path):
    """The pipeline's neighbours stage reads the embed stage's vectors for query chunks whose
    EOD-free tokens equal a DB chunk's (same text, so same encoder input); re-running the same
    stage function without the `embeddings` input embeds every query chunk (the old path).
    Both artifacts must agree, and the reuse count must be what a plain token comparison says."""
    from retro.components.retrieval.neighbours import neighbours
    from retro.platform.stage import typed_params
    from tests.retrieval.helpers import stage_ctx

    _, (_, arts), _ = dense
    art = arts["neighbours-train"]
    db = ChunkDB(arts["chunk-db"], arts["tokenize"])
    seqs = Sequences(arts["sequences-train"])
    eod = seqs.eod_id
    db_chunks = {tuple(t for t in db.chunk_tokens(np.array([i]))[0] if t != eod)
                 for i in range(db.n_chunks)}
    queries = [tuple(t for t in row[j * 64:(j + 1) * 64] if t != eod)
               for row in seqs.tokens for j in range(4)]
    expected = sum(q in db_chunks for q in queries)
    assert expected > 0  # the first train document starts the stream: its chunks line up
    summary = art.manifest["summary"]
    assert summary["reused_db_embeddings"] == pytest.approx(expected / len(queries))
    slots = ("sequences", "chunk_db", "tokens", "tokenizer", "index")
    inputs = {"sequences": arts["sequences-train"], "chunk_db": arts["chunk-db"],
              "tokens": arts["tokenize"], "tokenizer": arts["tokenizer"],
              "index": arts["fill-index"]}
    ctx = stage_ctx(tmp_path, "nbr-all", typed_params("neighbours", art.manifest["params"]),
                    {s: inputs[s].path for s in slots})
    assert neighbours(ctx)["reused_db_embeddings"] == 0
    assert np.array_equal(np.load(ctx.out_dir / "neighbours.npy"),
                          np.load(art.file("neighbours.npy")))
    np.testing.assert_allclose(np.load(ctx.out_dir / "scores.npy"),
                               np.load(art.file("scores.npy")), atol=1e-5)
