"""The report's arms table (the `families` comparison): several arms against one base, each with
its paired relative Δ, its per-token cost, the stages it needs beyond the base and whether it
trained — checked against hand computations on a synthetic run."""

from __future__ import annotations

import json
import math

import matplotlib.image as mpimg

from retro.platform.comparisons import Arm, ItemCache, compare, score_arms
from retro.platform.report import Report, StageInfo, to_markdown
from retro.platform.report_arms import arm_rows
from retro.platform.report_plots import make_plots
from retro.platform.results import ItemSet, MetricDecl, Results, write_results

NLL_BASE = [30.0, 40.0, 50.0, 60.0]     # per sequence, 10 tokens each
NLL_KNN = [27.0, 36.0, 45.0, 54.0]      # 10% less NLL: ppl x exp(-0.45) = -36.2%
NLL_RETRO = [33.0, 44.0, 55.0, 66.0]    # 10% more NLL
NLL_CONTROL = [31.0, 41.0, 51.0, 61.0]


def _eval(tmp, sid, inputs, nll, condition=None, reference=False, summary=None):
    path = tmp / sid
    path.mkdir()
    (path / "rows.jsonl").write_text("".join(
        json.dumps({"seq": i, "nll": x, "tokens": 10, "bytes": 40}) + "\n"
        for i, x in enumerate(nll)))
    write_results(path, Results(
        family="ppl/x", subject=["model"], condition=condition or {}, reference=reference,
        sets=[ItemSet(name="valid", file="rows.jsonl", id="seq", source="seqs", metrics={
            "ppl": MetricDecl(aggregate="exp-ratio", num="nll", den="tokens", better="lower",
                              headline=True),
            "bpb": MetricDecl(aggregate="ratio", num="nll", den="bytes",
                              scale=1 / math.log(2), better="lower")})]))
    info = StageInfo(sid, sid, sid, "k", ["main"], "done", summary=summary or {},
                     inputs=inputs, path=path, seconds=1.0)
    info.results = Results.model_validate_json((path / "results.json").read_text())
    return info


def _run(tmp):
    def stage(sid, inputs=None, summary=None, seconds=0.0):
        return StageInfo(sid, sid, sid, "k", ["main"], "done", summary=summary or {},
                         inputs=inputs or {}, seconds=seconds)

    stages = [
        stage("seqs"), stage("gpt", {"sequences": "seqs"}, {"steps": 120}, 50.0),
        _eval(tmp, "base", {"model": "gpt", "sequences": "seqs"}, NLL_BASE, reference=True),
        stage("store", {"model": "gpt", "sequences": "seqs"}, {"bytes": 1000}, 5.0),
        stage("index", {"embeddings": "store"}, {"bytes": 500}, 2.0),
        _eval(tmp, "knn", {"model": "gpt", "sequences": "seqs", "datastore": "store",
                           "index": "index"}, NLL_KNN, {"retrieval": "knn-lm"},
              summary={"searches_per_token": 1.0, "key_reads_per_token": 64.0}),
        stage("fit", {"init": "gpt", "sequences": "seqs"},
              {"steps": 60, "global_batch": 8, "tokens": 122880}, 30.0),
        stage("control", {"init": "gpt", "sequences": "seqs"}, {"steps": 60}, 20.0),
        _eval(tmp, "retro", {"model": "fit", "sequences": "seqs"}, NLL_RETRO),
        _eval(tmp, "ctl", {"model": "control", "sequences": "seqs"}, NLL_CONTROL,
              reference=True),
    ]
    arms = {s.id: Arm(s.id, s.name, s.inputs, s.results, s.path)
            for s in stages if s.results is not None}
    cache = ItemCache()
    scored = score_arms(list(arms.values()), cache)
    comps = compare(arms, {"main": {a: a for a in arms}}, cache)
    return stages, scored, comps


def test_every_family_against_the_base_with_its_extra_cost(tmp_path):
    stages, scored, comps = _run(tmp_path)
    rows = {r.name: r for r in arm_rows(stages, scored, comps)}
    assert list(rows) == ["base", "knn", "retro", "ctl"]
    ppl = lambda nll: math.exp(sum(nll) / 40)
    assert math.isclose(rows["base"].estimates["ppl"].estimate.value, ppl(NLL_BASE))
    knn = rows["knn"].versus
    assert knn.b == "base" and knn.verdict == "better"
    assert math.isclose(knn.diff.rel, ppl(NLL_KNN) / ppl(NLL_BASE) - 1)
    # kNN-LM needs its datastore and index beyond the base, and no training
    assert rows["knn"].extra_stages == ["store", "index"]
    assert rows["knn"].extra_bytes == 1500 and rows["knn"].extra_seconds == 7.0
    assert rows["knn"].training == [] and rows["knn"].per_token == {
        "searches_per_token": 1.0, "key_reads_per_token": 64.0}
    # RETRO: measured against the base and its control; it trains, the shared GPT does not count
    retro = rows["retro"]
    assert retro.versus.b == "base" and [c.b for c in retro.also] == ["ctl"]
    assert math.isclose(retro.versus.diff.rel, ppl(NLL_RETRO) / ppl(NLL_BASE) - 1)
    assert math.isclose(retro.also[0].diff.rel, ppl(NLL_RETRO) / ppl(NLL_CONTROL) - 1)
    assert retro.training == [{"stage": "fit", "steps": 60, "global_batch": 8, "tokens": 122880,
                               "seconds": 30.0}]
    assert rows["ctl"].versus is None and rows["ctl"].training[0]["stage"] == "control"
    assert rows["base"].versus is None and rows["base"].extra_stages == []


def test_the_table_and_plot_in_the_report(tmp_path):
    stages, scored, comps = _run(tmp_path)
    rep = Report("r", tmp_path, "done", "fam", "", ["main"], stages, {}, [], [],
                 comparisons=comps, arms=arm_rows(stages, scored, comps))
    md = to_markdown(rep)
    assert "## Arms against one base: quality and cost" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| knn |"))
    assert "-36.2% [" in line and "vs base (better)" in line and "1.5 kB, 7 s" in line
    assert line.rstrip(" |").endswith("none")                   # no training
    retro = next(ln for ln in md.splitlines() if ln.startswith("| retro |"))
    assert "fit: 60 steps × 8 sequences, 122880 tokens, 30 s" in retro
    assert "vs ctl (worse)" in retro
    (tmp_path / "plots").mkdir()
    plots = {p.name: p for p in make_plots(rep, tmp_path / "plots")}
    img = mpimg.imread(plots["arms.png"])
    assert img.shape[1] > 500 and img[..., :3].std() > 0.05


def test_one_arm_against_a_base_is_no_table(tmp_path):
    stages, scored, comps = _run(tmp_path)
    only = [c for c in comps if c.a_id == "retro"]                 # RETRO vs GPT only
    assert arm_rows(stages, scored, only) == []
