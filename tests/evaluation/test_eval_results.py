"""The evaluators' results.json declarations: what `retro report` pairs and pools back.

The platform's pooled aggregates of the declared per-item files must reproduce each stage's own
summary (ppl = exp(sum nll / sum tokens), bpb, EM / F1 in %), and the declarations must pair
Retro with its gate-0 ablation and with the GPT, nothing else.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from retro.components.evaluators.qa import QAEvaluator
from retro.components.evaluators.results import declare_qa
from retro.platform.comparisons import Arm, ItemCache, compare, find_pairs, score_arms
from retro.platform.results import read_results
from tests.evaluation.test_evaluators import db, models, run_ppl  # noqa: F401 - fixtures


def test_ppl_declarations_pool_back_to_the_summary_and_pair_retro_gate0_gpt(tmp_path, db,
                                                                             models):
    runs = {"retro": run_ppl(tmp_path, db, models["retro"], "retro"),
            "gate0": run_ppl(tmp_path, db, models["retro"], "gate0", encoder=False),
            "gpt": run_ppl(tmp_path, db, models["gpt"], "gpt")}
    decl = {n: read_results(ctx.out_dir) for n, (_, ctx) in runs.items()}
    assert decl["retro"].condition == {} and decl["gate0"].condition == {"encoder": False}
    assert decl["gpt"].reference and not decl["retro"].reference
    assert len({d.family for d in decl.values()}) == 1
    model_of = {"retro": "m-retro", "gate0": "m-retro", "gpt": "m-gpt"}
    arms = {n: Arm(n, n, {"model": model_of[n]}, decl[n], runs[n][1].out_dir) for n in runs}
    cache = ItemCache()
    for s in score_arms(list(arms.values()), cache):
        summary = runs[s.stage_id][0]
        assert s.estimate.n == summary["sequences"] == 6
        assert s.estimate.value == pytest.approx(summary[s.metric], rel=1e-9), s.metric
    variants = {"v": {n: n for n in runs}}
    assert sorted((k, a, b) for k, a, b, _ in find_pairs(arms, variants)) == [
        ("ablation", "gate0", "retro"), ("subject", "retro", "gpt")]
    by = {(c.a, c.b, c.metric): c for c in compare(arms, variants, cache)}
    d = by["retro", "gpt", "ppl"].diff
    assert d.delta == pytest.approx(runs["retro"][0]["ppl"] - runs["gpt"][0]["ppl"], rel=1e-9)
    assert d.n == 6 and d.lo <= d.delta <= d.hi


def test_qa_declaration_reads_the_prediction_records(tmp_path, shared_data):
    cfg = QAEvaluator.Config(datasets=["nq_open", "triviaqa_open"], data_dir=str(shared_data))
    (tmp_path / "predictions").mkdir()
    scores = {"nq_open": [(1.0, 1.0), (0.0, 0.5), (0.0, 0.0), (1.0, 1.0)],
              "triviaqa_open": [(0.0, 0.25), (1.0, 1.0)]}
    for ds, rows in scores.items():   # the fields answer_one writes per question
        (tmp_path / "predictions" / f"{ds}.jsonl").write_text("".join(
            json.dumps({"id": f"{ds}-{i}", "em": em, "f1": f1}) + "\n"
            for i, (em, f1) in enumerate(rows)))
    ctx = SimpleNamespace(out_dir=tmp_path, params=SimpleNamespace(retrieval_context=False))
    declare_qa(ctx, cfg, is_retro=False, fields=("datasets", "limit"))
    decl = read_results(tmp_path)
    assert decl.condition == {"retrieval_context": False} and decl.reference
    assert decl.subject == ["model", "contexts"]
    got = {(s.set, s.metric): s.estimate.value
           for s in score_arms([Arm("q", "q", {}, decl, tmp_path)], ItemCache())}
    assert got == pytest.approx({("nq_open", "em"): 50.0, ("nq_open", "f1"): 62.5,
                                 ("triviaqa_open", "em"): 50.0, ("triviaqa_open", "f1"): 62.5})
