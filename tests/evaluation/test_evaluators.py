"""The eval-ppl, qa-retrieve and eval-qa stages on small real artifacts.

A real retrieval DB (20 wiki articles, GPT-2 BPE, 16-token chunks, MiniLM + faiss Flat) is
built once by the `retro-db` recipe on a local Ray; a tiny random Retro model (retro-nano) and
its own decoder saved as a plain transformers model (the "GPT-fit" stand-in: the same decoder
weights) are scored by the stage functions, which run inline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from retro.components.evaluators.metrics import qa_scores
from retro.components.evaluators.ppl import eval_ppl, eval_ppl_calls
from retro.components.evaluators.qa_data import load_questions
from retro.components.evaluators.qa import (eval_qa, eval_qa_calls, qa_retrieve,
                                            qa_retrieve_call, read_predictions)
from retro.platform import api
from retro.platform.spec import load_spec
from tests.conftest import SHARED_DATA
from tests.evaluation.helpers import (CHUNK, artifacts_by_name, as_artifact, db_spec,
                                      metrics_rows, stage_ctx)
from tests.models.helpers import tiny

PPL = {"type": "ppl", "max_sequences": 6, "batch_size": 3}


@pytest.fixture(scope="module")
def db(tmp_path_factory, ray_session):
    """Artifacts of a real dense retrieval DB, by call name."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    tmp = tmp_path_factory.mktemp("evaldb")
    record, outcome, plan = api.run(db_spec(tmp, SHARED_DATA))
    assert outcome.ok, outcome.failures
    return artifacts_by_name(tmp / "store", plan)


@pytest.fixture(scope="module")
def models(tmp_path_factory, db):
    """A random retro-nano checkpoint (16-token chunks, GPT-2 vocab) and its decoder alone."""
    from retro.components.models.retro import build_model

    out = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = build_model(tiny(), 50257, CHUNK)
    retro_dir = model.save_pretrained(out / "retro")
    return {"retro": as_artifact(retro_dir), "gpt": as_artifact(retro_dir / "decoder")}


def run_ppl(tmp, db, model, name, **consts):
    inputs = {"model": model, "sequences": db["sequences-valid"], "tokenizer": db["tokenizer"],
              "neighbours": db["neighbours-valid"], "chunk_db": db["chunk-db"],
              "tokens": db["tokenize"]}
    ctx = stage_ctx(tmp, name, {"evaluator": PPL, **consts}, inputs)
    return eval_ppl(ctx), ctx


def test_ppl_retro_gate0_and_gpt(tmp_path, db, models):
    retro, ctx = run_ppl(tmp_path, db, models["retro"], "retro")
    gate0, _ = run_ppl(tmp_path, db, models["retro"], "gate0", encoder=False)
    gpt, _ = run_ppl(tmp_path, db, models["gpt"], "gpt")
    assert retro["uses_neighbours"] and not gate0["uses_neighbours"]
    assert not gpt["uses_neighbours"]
    # gate 0 bypasses the encoder: exactly the decoder's (= the GPT's) perplexity
    assert gate0["ppl"] == pytest.approx(gpt["ppl"], rel=1e-9)
    # the random encoder + CCA change the predictions when neighbours are read
    assert abs(retro["loss"] - gate0["loss"]) > 1e-4
    for s in (retro, gate0, gpt):
        assert s["sequences"] == 6 and s["tokens"] == 6 * 63
        assert math.exp(s["loss"]) == pytest.approx(s["ppl"])
        # a random 50k-vocab model is near uniform: loss ~ ln(50257) = 10.8
        assert 9 < s["loss"] < 13
        assert s["bpb"] == pytest.approx(s["loss"] * s["tokens"] / math.log(2) / s["bytes"])
    rows = [json.loads(x) for x in (ctx.out_dir / "per_sequence.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and sum(r["nll"] for r in rows) == pytest.approx(
        retro["loss"] * retro["tokens"])
    assert [r["step"] for r in metrics_rows(ctx)] == [3, 6]  # streamed per batch


def test_ppl_with_retrieved_text_in_context(tmp_path, db, models):
    plain, _ = run_ppl(tmp_path, db, models["gpt"], "plain")
    in_ctx, _ = run_ppl(tmp_path, db, models["gpt"], "in-ctx", retrieval_context=True)
    assert in_ctx["tokens"] == plain["tokens"] and in_ctx["bytes"] == plain["bytes"]
    assert in_ctx["loss"] != pytest.approx(plain["loss"], abs=1e-6)


def test_qa_retrieve_then_answer_with_and_without_context(tmp_path, db, models, shared_data):
    """Every record lists what the model received. Closed-book (`retrieval_context: false`)
    gets nothing retrieved, even with the encoder on and a contexts input present (issue 13
    defect 2); the encoder-only variant feeds the encoder only; SQuAD is reading comprehension
    from its own paragraph (InstructRetro §5.1, REFERENCE §5.1: "all other tasks use the
    contexts supplied with the dataset")."""
    qa = {"type": "qa", "datasets": ["nq_open", "triviaqa_open", "squad_v2"],
          "data_dir": str(shared_data),
          "limit": 3, "retrieve_k": 4, "passages": 2, "encoder_neighbours": 2,
          "max_new_tokens": 4}
    ctx = stage_ctx(tmp_path, "qa-retrieve", {
        "datasets": qa["datasets"], "data_dir": qa["data_dir"], "limit": 3,
        "answer_in_corpus": False, "retrieve_k": 4, "retriever_type": "dense",
        "embedder": {"type": "hf-mean-pool"}, "index": {"type": "faiss", "factory": "Flat"}},
        {s: db[c] for s, c in (("tokenizer", "tokenizer"), ("tokens", "tokenize"),
                               ("chunk_db", "chunk-db"), ("index", "fill-index"))})
    recall = qa_retrieve(ctx)
    contexts = as_artifact(ctx.out_dir, "qa-retrieve")
    rows = [json.loads(x) for x in (ctx.out_dir / "contexts/nq_open.jsonl").read_text()
            .splitlines()]
    assert len(rows) == 3 and all(len(r["passages"]) == 4 for r in rows)
    assert {"chunk_id", "doc_id", "title", "text", "score"} <= set(rows[0]["passages"][0])
    assert 0 <= recall["nq_open/recall@1"] <= recall["nq_open/recall@4"] <= 100

    gold = {e.id: e.context["paragraph_id"]
            for e in load_questions(shared_data, "squad_v2", 3)}
    scores, raws = {}, {}
    for name, consts, inputs in (
            ("rag", {}, {"contexts": contexts}),
            ("rag-gate0", {"encoder": False}, {"contexts": contexts}),
            ("closed", {"retrieval_context": False}, {"contexts": contexts}),
            ("closed-no-contexts", {"retrieval_context": False}, {}),
            ("encoder-only", {"retrieval_context": False, "context_in_encoder_only": True},
             {"contexts": contexts})):
        c = stage_ctx(tmp_path, name, {"evaluator": qa, **consts},
                      {"model": models["retro"], "tokenizer": db["tokenizer"], **inputs})
        scores[name] = eval_qa(c)
        for ds in qa["datasets"]:
            preds = read_predictions(c.out_dir, ds)
            assert len(preds) == 3
            # the summary is the mean of the per-example scores (in %)
            em = 100 * sum(qa_scores(p["prediction"], p["answers"])["em"] for p in preds) / 3
            f1 = 100 * sum(qa_scores(p["prediction"], p["answers"])["f1"] for p in preds) / 3
            assert scores[name][f"{ds}/em"] == pytest.approx(em)
            assert scores[name][f"{ds}/f1"] == pytest.approx(f1)
            assert all(p["prompt_tokens"] > 20 for p in preds)
            raws[name, ds] = [p["raw"] for p in preds]
            ctx_rows = {r["id"]: r for r in map(json.loads, (
                ctx.out_dir / f"contexts/{ds}.jsonl").read_text().splitlines())}
            for p in preds:
                top = [x["chunk_id"] for x in ctx_rows[p["id"]]["passages"]]
                if ds == "squad_v2":   # its own paragraph, never the retrieved passages
                    top = [gold[p["id"]]]
                prompt_ids = top[:2] if name in ("rag", "rag-gate0") else []
                encoder_ids = top[:2] if name in ("rag", "encoder-only") else []
                assert p["passage_ids"] == prompt_ids, (name, ds)
                assert p["encoder_passage_ids"] == encoder_ids, (name, ds)
    for ds in qa["datasets"]:   # closed-book: the contexts input changes nothing
        assert raws["closed", ds] == raws["closed-no-contexts", ds]
    assert "nq_open/answer_in_prompt" in scores["rag"]
    assert "nq_open/answer_in_prompt" not in scores["closed"]


class _FakeLM:
    def __init__(self, is_retro):
        self.is_retro = is_retro


@pytest.mark.parametrize("consts, retro, prompt, encoder", [
    ({}, True, ["a", "b"], ["a"]),
    ({"encoder": False}, True, ["a", "b"], []),
    ({}, False, ["a", "b"], []),
    ({"retrieval_context": False}, True, [], []),                    # closed-book: nothing
    ({"retrieval_context": False, "context_in_encoder_only": True}, True, [], ["a"]),
])
def test_model_inputs_closed_book_gets_nothing(consts, retro, prompt, encoder, shared_data):
    from retro.components.evaluators.qa import model_inputs, settings

    cfg = settings({"evaluator": {"type": "qa", "data_dir": str(shared_data), "passages": 2,
                                  "encoder_neighbours": 1}, **consts})
    row = {"passages": [{"chunk_id": c, "text": c} for c in "abc"]}
    got = model_inputs(_FakeLM(retro), cfg, row)
    assert [[p["chunk_id"] for p in part] for part in got] == [prompt, encoder]
    # a reading-comprehension row uses its own paragraph in place of the retrieved ones
    gold = {"paragraph_id": "p0", "title": "T", "text": "gold"}
    rc = model_inputs(_FakeLM(retro), cfg, {**row, "context": gold})
    assert rc == tuple([gold] if part else [] for part in (prompt, encoder))


def test_squad_v2_is_reading_comprehension_and_squad_v2_open_is_not(shared_data):
    rc = load_questions(shared_data, "squad_v2", 20)
    open_ = load_questions(shared_data, "squad_v2_open", 20)
    assert [e.question for e in rc] == [e.question for e in open_]
    assert all(e.context is None for e in open_)
    for e in rc:   # the dataset's own paragraph holds the gold answer span
        assert e.context["paragraph_id"] and any(a in e.context["text"] for a in e.answers)


def test_qa_encoder_neighbours_are_padded_like_training(db):
    """One neighbour-padding convention (issue 13 defect 8): a passage given to the encoder is
    laid out as training's `ChunkDB.neighbour_tokens` lays out a DB chunk and its continuation,
    EOD-padded (Megatron, REFERENCE §2.2/§2.6), not masked with -1."""
    from retro.components.evaluators.qa import neighbour_block
    from retro.components.retrieval.api import ChunkDB, load_tokenizer

    tok = load_tokenizer(db["tokenizer"])
    cdb = ChunkDB(db["chunk-db"].path, db["tokenize"].path)
    m, eod = cdb.chunk_length, cdb.pad_id
    checked = {"end": 0, "continued": 0}
    for c in range(cdb.n_chunks):
        nb = cdb.neighbour_tokens(np.array([c]))[0]
        ids = [int(t) for t in nb if t != eod]
        text = tok.decode(ids)
        if tok.encode(text, add_special_tokens=False) != ids:
            continue        # BPE does not round-trip this cut; the layout is what is tested
        kind = "end" if cdb.continuation(np.array([c]))[0] < 0 else "continued"
        if kind == "continued" and int((nb[:m] == eod).sum()):
            continue
        assert neighbour_block(tok, text, m, eod) == nb.tolist()
        checked[kind] += 1
    assert checked["end"] >= 3 and checked["continued"] >= 3, checked


def test_eval_qa_refuses_context_without_contexts_input(tmp_path, models, shared_data):
    from retro.platform.errors import UserError

    qa = {"type": "qa", "data_dir": str(shared_data), "limit": 1}
    ctx = stage_ctx(tmp_path, "bad", {"evaluator": qa}, {"model": models["retro"]})
    with pytest.raises(UserError, match="contexts"):
        eval_qa(ctx)


def test_call_helpers_wire_slots_and_share_closed_book(tmp_path, shared_data):
    spec = load_spec(db_spec(tmp_path, shared_data)).spec
    retrieve = qa_retrieve_call(spec, "eval.1")
    assert retrieve.inputs == {"tokenizer": "tokenizer", "tokens": "tokenize",
                               "chunk_db": "chunk-db", "index": "fill-index"}
    assert retrieve.reads["retrieve_k"] == "eval.1.retrieve_k"
    calls = eval_qa_calls("eval.1", "import-gguf", suffix="smol", retro_model=False,
                          ablations=[{}, {"retrieval_context": False}])
    assert [c.name for c in calls] == ["eval-qa-smol", "eval-qa-smol-ctx-off"]
    assert "contexts" in calls[0].inputs and "contexts" not in calls[1].inputs
    ppl = eval_ppl_calls("eval.0", "gpt-fit", suffix="gpt", retro_model=False)
    assert set(ppl[0].inputs) == {"model", "sequences", "tokenizer"}
    ppl = eval_ppl_calls("eval.0", "retro-fit", suffix="retro",
                         ablations=[{}, {"encoder": False}])
    assert [c.name for c in ppl] == ["eval-ppl-retro", "eval-ppl-retro-encoder-off"]
    assert ppl[0].inputs["neighbours"] == "neighbours-valid"
    assert "neighbours" not in ppl[1].inputs


def test_rag_eval_spec_plans_closed_book_once_for_both_retrievers():
    from retro.platform.api import validate

    loaded, plan = validate(Path(__file__).resolve().parents[2] / "specs/rag-eval-smollm2.yaml")
    by_name = {}
    for s in plan.stages:
        by_name.setdefault(s.name, []).append(s)
    closed = by_name["eval-qa-ctx-off"]
    assert len(closed) == 1 and closed[0].variants == ["dense", "bm25"]
    assert "contexts" not in closed[0].inputs
    assert [sorted(s.variants) for s in by_name["eval-qa"]] == [["dense"], ["bm25"]]
    assert all(s.inputs["contexts"].startswith("qa-retrieve@") for s in by_name["eval-qa"])
    assert len(by_name["import-gguf"]) == 1 and "embed" in by_name and "bm25-index" in by_name


def test_keys_ignore_fields_a_call_cannot_use(tmp_path):
    from retro.platform.plan import build_plan
    from retro.platform.spec import load_spec

    spec = tmp_path / "rag.yaml"
    spec.write_text((Path(__file__).resolve().parents[2] / "specs/rag-eval-smollm2.yaml")
                    .read_text())

    def keys(*overrides):
        plan = build_plan(load_spec(spec, overrides))
        return {(s.name, tuple(s.variants)): s.key for s in plan.stages}

    base = keys()
    more = keys("eval.0.passages=3", "eval.0.retrieve_k=10")
    closed = ("eval-qa-ctx-off", ("dense", "bm25"))
    assert more[closed] == base[closed]                        # closed-book: no passages
    assert more[("eval-qa", ("dense",))] != base[("eval-qa", ("dense",))]
    assert keys("eval.0.retrieval_context=false")[closed] == base[closed]  # overridden by const


def test_eval_qa_resumes_after_the_last_saved_prediction(tmp_path, db, models, shared_data):
    qa = {"type": "qa", "data_dir": str(shared_data), "limit": 3, "max_new_tokens": 2,
          "retrieval_context": False}
    ctx = stage_ctx(tmp_path, "resume", {"evaluator": qa},
                    {"model": models["retro"], "tokenizer": db["tokenizer"]})
    saved = {"id": "nq-test-00000", "prediction": "December 1972", "em": 1.0, "f1": 1.0}
    (ctx.work_dir / "predictions").mkdir()
    (ctx.work_dir / "predictions" / "nq_open.jsonl").write_text(
        json.dumps(saved) + "\n" + '{"id": "nq-test-0000')          # second line cut by a crash
    summary = eval_qa(ctx)
    preds = read_predictions(ctx.out_dir, "nq_open")
    assert preds[0] == saved and len(preds) == 3
    assert [p["id"] for p in preds[1:]] == ["nq-test-00002", "nq-test-00003"]
    assert summary["nq_open/em"] >= 100 / 3 - 1e-9   # the saved exact match counts
