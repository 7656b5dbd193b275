"""The eval-ppl, qa-retrieve and eval-qa stages on small real artifacts.

A real retrieval DB (20 wiki articles, GPT-2 BPE, 16-token chunks, MiniLM + faiss Flat) is
built once by the `retro-db` recipe on a local Ray; a tiny random Retro model (retro-nano) and
its own decoder saved as a plain transformers model (the "GPT-fit" stand-in: the same decoder
weights) are scored by the stage functions, which run inline.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from retro.components.evaluators.metrics import qa_scores
from retro.components.evaluators.ppl import PplEvaluator, eval_ppl, eval_ppl_calls
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
# scores compared to 1e-5 are computed in fp32 (the node's precision field, where it exists)
_FP32 = {"precision": "fp32"} if "precision" in PplEvaluator.Config.model_fields else {}


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
    ctx = _stage_ctx(tmp, name, "eval-ppl", {"evaluator": {**PPL, **_FP32}, **consts}, inputs)
    return eval_ppl(ctx), ctx


def _stage_ctx(tmp, name, stage, params, inputs):
    """`stage_ctx` for call `name` of stage type `stage`, whichever params contract (plain dict
    or the stage's typed params model) the stage has."""
    import dataclasses

    from retro.platform import stage as stage_module

    ctx = stage_ctx(tmp, stage, params, inputs)
    if hasattr(stage_module, "typed_params"):
        params = stage_module.typed_params(stage, params)
    out, work = tmp / name / "out", tmp / name / "work"
    import shutil

    shutil.rmtree(tmp / name, ignore_errors=True)
    out.mkdir(parents=True)
    work.mkdir(parents=True)
    return dataclasses.replace(ctx, name=name, params=params, out_dir=out, work_dir=work)


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
    rows = [json.loads(x) for x in (ctx.out_dir / "per_sequence.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and sum(r["nll"] for r in rows) == pytest.approx(
        retro["loss"] * retro["tokens"])
    assert [r["step"] for r in metrics_rows(ctx)] == [3, 6]  # streamed per batch


def test_ppl_runs_on_the_stage_gpu_when_given_one(tmp_path, db, models, monkeypatch):
    """A stage with `gpus_per_worker > 0` on a CUDA host loads the model and autocasts on
    "cuda" (simulated: CUDA reported present, the model still loaded on CPU to run here)."""
    import contextlib
    import dataclasses

    import retro.components.evaluators.ppl as ppl
    from retro.platform.spec.model import ResourceRequest

    seen = []
    real_load = ppl.load_eval_lm
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ppl, "load_eval_lm", lambda *a, device="cpu", **k:
                        seen.append(("load", device)) or real_load(*a, **k))
    monkeypatch.setattr(ppl, "stage_precision", lambda ctx, req, device="cpu":
                        seen.append(("precision", device)) or "fp32")
    monkeypatch.setattr(ppl, "inference_autocast", lambda model, prec, device="cpu":
                        seen.append(("autocast", device)) or contextlib.nullcontext())
    inputs = {"model": models["gpt"], "sequences": db["sequences-valid"],
              "tokenizer": db["tokenizer"], "neighbours": db["neighbours-valid"],
              "chunk_db": db["chunk-db"], "tokens": db["tokenize"]}
    for gpus, device in ((0.0, "cpu"), (1.0, "cuda")):
        ctx = _stage_ctx(tmp_path, f"gpu{gpus}", "eval-ppl", {"evaluator": {**PPL, **_FP32}},
                         inputs)
        eval_ppl(dataclasses.replace(ctx, resources=ResourceRequest(gpus_per_worker=gpus)))
        assert seen == [("load", device), ("precision", device), ("autocast", device)]
        seen.clear()


def test_ppl_with_retrieved_text_in_context(tmp_path, db, models, monkeypatch):
    """In-context RAG scores chunk j after exactly: chunk j-1's top neighbour and its
    continuation as the DB stores them (no EOD padding, nothing for a missing continuation),
    then the preceding tokens of the sequence, cut from the left only so that prompt + chunk
    fit the no-RAG baseline's window, the sequence length (issue 13 defect 5). The expected
    prompt is rebuilt here from the chunk table by hand."""
    from retro.components.evaluators import ppl as ppl_module
    from retro.components.retrieval.api import ChunkDB

    seen = []
    real = ppl_module.token_nll

    def spy(lm, ids, labels, neighbours=None):
        seen.append((ids.clone(), labels.clone()))
        return real(lm, ids, labels, neighbours)

    plain, _ = run_ppl(tmp_path, db, models["gpt"], "plain")
    monkeypatch.setattr(ppl_module, "token_nll", spy)       # the name eval-ppl calls
    in_ctx, _ = run_ppl(tmp_path, db, models["gpt"], "in-ctx", retrieval_context=True)
    assert in_ctx["tokens"] == plain["tokens"] and in_ctx["bytes"] == plain["bytes"]
    assert in_ctx["loss"] != pytest.approx(plain["loss"], abs=1e-6)

    cdb = ChunkDB(db["chunk-db"].path, db["tokenize"].path)
    seqs = np.load(db["sequences-valid"].path / "tokens.npy")
    ids = np.load(db["neighbours-valid"].path / "neighbours.npy")

    def chunk(c):          # the chunk's own tokens, no padding
        _, start, length = cdb.chunks[c]
        return cdb.tokens[start:start + length].tolist()

    n, m = seqs.shape[1], CHUNK
    calls = iter(seen)
    checked = 0
    for start in range(0, 6, PPL["batch_size"]):
        next(calls)                                   # chunk 0: the sequence alone
        for j in range(1, n // m):
            x, labels = next(calls)
            for i, row in enumerate(range(start, start + PPL["batch_size"])):
                c = int(ids[row, j - 1, 0])
                retrieved = []
                if c >= 0:
                    retrieved = chunk(c)
                    if c + 1 < cdb.n_chunks and cdb.chunks[c + 1][0] == cdb.chunks[c][0]:
                        retrieved += chunk(c + 1)
                # the baseline's window: prompt + chunk hold at most n tokens, so the oldest
                # sequence tokens go first
                keep = min(j * m, n - len(retrieved) - m)
                prompt = retrieved + seqs[row, j * m - keep:j * m].tolist()
                target = seqs[row, j * m:(j + 1) * m].tolist()
                assert x[i, :len(prompt) + m].tolist() == prompt + target
                assert labels[i, len(prompt) - 1:len(prompt) - 1 + m].tolist() == target
                assert (labels[i, :len(prompt) - 1] < 0).all()
                checked += 1
    assert checked == 6 * (n // m - 1)


def test_in_context_prompt_drops_padding_and_keeps_the_baseline_window():
    from retro.components.evaluators.ppl_inputs import in_context_prompt

    eod = 0
    seq = list(range(100, 116))                               # n = 16, chunks of 4
    # one neighbour of 2 tokens (EOD-padded) whose continuation is missing (all EOD), and a
    # missing second neighbour (-1)
    retrieved = np.array([[7, 8, eod, eod, eod, eod, eod, eod], [-1] * 8])
    assert in_context_prompt(seq, 8, 12, retrieved, eod, window=16) == [7, 8] + seq[:8]
    # a window of 10: prompt + chunk fit 10 tokens, the sequence is cut from the left
    assert in_context_prompt(seq, 8, 12, retrieved, eod, window=10) == [7, 8] + seq[4:8]


def test_ppl_uses_the_neighbours_the_model_trained_with(tmp_path, db, models):
    """eval-ppl scores a Retro model with the k it trained with (issue 13 defect 3: the 48B
    spec trains on 2 of 20 saved neighbours): on the same rows it equals the training loop's
    validation perplexity (components/training/loop.py `evaluate`) to 1e-5."""
    import shutil
    from types import SimpleNamespace

    from retro.components.evaluators.lm import load_eval_lm
    from retro.components.training.data import NpyRows
    from retro.components.training.loop import evaluate
    from retro.components.training.stages import db_neighbours

    k = 1                                           # the DB saved 2 per chunk
    model_dir = tmp_path / "retro-k1"
    shutil.copytree(models["retro"].path, model_dir)
    (model_dir / "training.json").write_text(json.dumps({"stage": "retro-fit",
                                                         "num_neighbours": k}))
    scores, _ = run_ppl(tmp_path, db, as_artifact(model_dir), "k1")
    rows = NpyRows(str(db["sequences-valid"].path / "tokens.npy"), 64,
                   neighbours=functools.partial(
                       db_neighbours, str(db["neighbours-valid"].path / "neighbours.npy"),
                       str(db["chunk-db"].path), str(db["tokenize"].path), k),
                   pad_id=50256)()
    model = load_eval_lm(model_dir, db["tokenizer"].path).model
    run = SimpleNamespace(eval_batches=2, micro_batch=3, precision="fp32")
    val = evaluate(model, rows, run, global_batch=3, rank=0, world=1, device=torch.device("cpu"))
    assert scores["ppl"] == pytest.approx(val["val_ppl"], rel=1e-5)
    all_k, _ = run_ppl(tmp_path, db, models["retro"], "all-k")   # no training.json: all 2
    assert all_k["ppl"] != pytest.approx(val["val_ppl"], rel=1e-5)


DOCS = ["Café au lait, naïve façade.", "Straße in 東京 🙂 — done."]


def test_bits_per_byte_counts_the_documents_own_bytes(tmp_path, db, models):
    """bpb as RETRO reports it (REFERENCE §5.4; RETRO §4): bits of the document text over its
    UTF-8 bytes. Two whole documents between EODs: the byte count must be the documents' own
    bytes, and the bits those of the tokens that spell them (an EOD has no bytes; its loss
    counts in ppl, not in bpb). The NLLs come from a plain forward here."""
    from retro.components.evaluators.lm import load_eval_lm
    from retro.components.retrieval.api import load_tokenizer

    tok = load_tokenizer(db["tokenizer"])
    eod = tok.eos_token_id
    row = [eod]
    for d in DOCS:
        row += tok.encode(d, add_special_tokens=False) + [eod]
    row += [eod] * (32 - len(row))
    seq_dir = tmp_path / "seqs"
    seq_dir.mkdir()
    np.save(seq_dir / "tokens.npy", np.array([row], dtype=np.int32))
    np.save(seq_dir / "seq_doc_offsets.npy", np.array([0, 2], dtype=np.int64))
    np.save(seq_dir / "seq_docs.npy", np.array([0, 1], dtype=np.int64))
    (seq_dir / "meta.json").write_text(json.dumps({"split": "valid", "seq_length": 32,
                                                   "eod_id": eod}))
    node = {**PPL, **_FP32}
    ctx = _stage_ctx(tmp_path, "bpb", "eval-ppl", {"evaluator": node},
                    {"model": models["gpt"], "sequences": as_artifact(seq_dir, "sequences"),
                     "tokenizer": db["tokenizer"]})
    s = eval_ppl(ctx)
    assert s["bytes"] == sum(len(d.encode("utf-8")) for d in DOCS)
    model = load_eval_lm(models["gpt"].path, db["tokenizer"].path).model
    x = torch.tensor([row])
    with torch.no_grad():
        logp = torch.log_softmax(model(x[:, :-1]).logits.double(), -1)[0]
    nll = -logp[torch.arange(31), x[0, 1:]]
    text = x[0, 1:] != eod
    assert s["bpb"] == pytest.approx(float(nll[text].sum()) / math.log(2) / s["bytes"],
                                     rel=1e-6)
    assert s["loss"] == pytest.approx(float(nll.mean()), rel=1e-6)   # ppl keeps the EOD


def test_token_bytes_sum_to_the_texts_utf8_bytes(db):
    from retro.components.evaluators.ppl_inputs import token_byte_lengths
    from retro.components.retrieval.api import load_tokenizer

    tok = load_tokenizer(db["tokenizer"])
    lengths = token_byte_lengths(tok)
    for text in DOCS + [" x" * 5, "\n\ttabs and\nnewlines", "ẞ𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert int(lengths[ids].sum()) == len(text.encode("utf-8")), text
    assert lengths[tok.eos_token_id] == 0


def test_qa_retrieve_then_answer_with_and_without_context(tmp_path, db, models, shared_data):
    """Every record lists what the model received. Closed-book (`retrieval_context: false`)
    gets nothing retrieved, even with the encoder on and a contexts input present (issue 13
    defect 2); the encoder-only variant feeds the encoder only; SQuAD is reading comprehension
    from its own paragraph (InstructRetro §5.1, REFERENCE §5.1: "all other tasks use the
    contexts supplied with the dataset")."""
    qa = {"type": "qa", "datasets": ["nq_open", "triviaqa_open", "squad_v2"],
          "data_dir": str(shared_data),
          "limit": 3, "retrieve_k": 5, "passages": 2, "encoder_neighbours": 2,
          "max_new_tokens": 4, **_FP32}
    ctx = stage_ctx(tmp_path, "qa-retrieve", {
        "evaluator": {"type": "qa", "datasets": qa["datasets"], "data_dir": qa["data_dir"],
                      "limit": 3, "answer_in_corpus": False, "retrieve_k": 5},
        "retriever": {"type": "dense", "embedder": {"type": "hf-mean-pool"},
                      "index": {"type": "faiss", "factory": "Flat"}}},
        {s: db[c] for s, c in (("tokenizer", "tokenizer"), ("tokens", "tokenize"),
                               ("chunk_db", "chunk-db"), ("index", "fill-index"))})
    recall = qa_retrieve(ctx)
    contexts = as_artifact(ctx.out_dir, "qa-retrieve")
    rows = [json.loads(x) for x in (ctx.out_dir / "contexts/nq_open.jsonl").read_text()
            .splitlines()]
    assert len(rows) == 3 and all(len(r["passages"]) == 5 for r in rows)
    assert {"chunk_id", "doc_id", "title", "text", "score"} <= set(rows[0]["passages"][0])
    assert 0 <= recall["nq_open/recall@1"] <= recall["nq_open/recall@5"] <= 100

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
        c = _stage_ctx(tmp_path, name, "eval-qa", {"evaluator": qa, **consts},
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

    params = {"evaluator": {"type": "qa", "data_dir": str(shared_data), "passages": 2,
                            "encoder_neighbours": 1}, **consts}
    from retro.platform import stage as stage_module

    if hasattr(stage_module, "typed_params"):
        params = stage_module.typed_params("eval-qa", params)
    cfg = settings(params)
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


def test_qa_node_checks_passages_against_retrieve_k(shared_data):
    """A spec asking for more prompt passages than it retrieves is an error, including the
    default `passages: 5` against `retrieve_k: 4`; qa-retrieve's narrowed copy of the node
    (retrieve_k only) is exempt by the platform, not by this check."""
    from retro.components.evaluators.qa import QAEvaluator

    node = {"data_dir": str(shared_data), "retrieve_k": 4}
    with pytest.raises(ValueError, match="must be <= retrieve_k"):
        QAEvaluator.Config.model_validate({**node, "passages": 6})
    with pytest.raises(ValueError, match="must be <= retrieve_k"):
        QAEvaluator.Config.model_validate(node)                  # passages defaults to 5
    assert QAEvaluator.Config.model_validate({**node, "passages": 4}).passages == 4


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
    from retro.components.retrieval.api import db_stage_calls
    from retro.platform.stage import StageCall

    spec = load_spec(db_spec(tmp_path, shared_data)).spec
    db = db_stage_calls(spec, seq_length="recipe.seq_length")
    by_name = {c.name: c for c in db}
    retrieve = qa_retrieve_call(spec, db, "eval.1")
    assert {s: c.name for s, c in retrieve.inputs.items()} == {
        "tokenizer": "tokenizer", "tokens": "tokenize", "chunk_db": "chunk-db",
        "index": "fill-index"}
    assert "retrieve_k" in retrieve.reads["evaluator"].fields
    model = StageCall("import-gguf", "import-gguf")
    calls = eval_qa_calls("eval.1", model, contexts=retrieve, suffix="smol", retro_model=False,
                          ablations=[{}, {"retrieval_context": False}])
    assert [c.name for c in calls] == ["eval-qa-smol", "eval-qa-smol-ctx-off"]
    assert "contexts" in calls[0].inputs and "contexts" not in calls[1].inputs
    ppl = eval_ppl_calls("eval.0", StageCall("gpt-fit", "gpt-fit"), db, suffix="gpt",
                         retro_model=False)
    assert set(ppl[0].inputs) == {"model", "sequences", "tokenizer"}
    ppl = eval_ppl_calls("eval.0", StageCall("retro-fit", "retro-fit"), db, suffix="retro",
                         ablations=[{}, {"encoder": False}])
    assert [c.name for c in ppl] == ["eval-ppl-retro", "eval-ppl-retro-encoder-off"]
    assert ppl[0].inputs["neighbours"] is by_name["neighbours-valid"]
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


def test_48b_plan_scores_retro_ppl_with_the_two_trained_neighbours():
    """The 48B spec trains Retro-fit on 2 of the 20 saved neighbours (Megatron's default,
    REFERENCE §0/§2.6); its eval-ppl call gets those 2, visible in `retro plan`."""
    from retro.platform.api import validate

    _, plan = validate(Path(__file__).resolve().parents[2] / "specs/instructretro-48b.yaml")
    by_name = {s.name: s for s in plan.stages}
    assert by_name["retro-fit"].params["num_neighbours"] == 2
    params = by_name["eval-ppl-retro"].params      # the node's k, else the trained k
    assert (params["evaluator"].get("neighbours") or params["train_neighbours"]) == 2
    assert by_name["eval-ppl-gpt"].params.get("train_neighbours") is None


def test_instructretro_recipe_runs_closed_book_and_encoder_only_qa():
    """Closed-book Retro QA reads no retrieval artifact; the encoder-only variant is its own
    call (issue 13 defect 2)."""
    from retro.platform.api import validate

    _, plan = validate(Path(__file__).resolve().parents[2] / "specs/instructretro-48b.yaml")
    by_name = {s.name: s for s in plan.stages}
    assert "contexts" not in by_name["eval-qa-retro-ctx-off"].inputs
    only = by_name["eval-qa-retro-ctx-encoder-only"]
    assert "contexts" in only.inputs and only.params["context_in_encoder_only"] is True
