"""`retro report` on a real 2-variant sweep: tables, differing spec fields, PNG plots."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import yaml

import retro.platform.report

from retro.platform.report import build_report, find_run, write_report
from retro.platform.runs import RunRecord


def test_report_tables_and_differences(tracked_sweep, tmp_path):
    rep = write_report(build_report(RunRecord(tracked_sweep)), tmp_path / "rep")
    assert rep.variants == ["offset=0", "offset=7"] and rep.status == "done"
    assert rep.metrics["total/total"] == {"offset=0": 90.0, "offset=7": 97.0}
    assert rep.metrics["scale/n"] == {"offset=0": 10.0, "offset=7": 10.0}  # shared stage
    assert [p for p, _ in rep.differences] == ["recipe.offset"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| total/total | 90 | 97 |" in md
    assert "| `recipe.offset` | `0` | `7` |" in md
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["metrics"]["total/total"]["offset=7"] == 97.0


def test_report_writes_valid_png_plots(tracked_sweep, tmp_path):
    rep = write_report(build_report(RunRecord(tracked_sweep)), tmp_path / "rep")
    names = sorted(p.name for p in rep.plots)
    assert names == ["curves.png", "metrics.png"]
    for path in rep.plots:
        assert path.stat().st_size > 10_000
        img = mpimg.imread(path)                    # decodes the PNG
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
        assert img[..., :3].std() > 0.05            # not a blank canvas


def test_report_cli_by_sweep_name(tracked_sweep, tmp_path):
    runs = tracked_sweep.parent
    assert find_run("toysweep", runs).dir == tracked_sweep   # spec name -> latest run
    proc = subprocess.run([sys.executable, "-m", "retro.cli.main", "report", "toysweep",
                           "--runs", str(runs), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "total/total" in proc.stdout and "recipe.offset" in proc.stdout
    assert (tmp_path / "out" / "report.md").exists() and (tmp_path / "out" / "curves.png").exists()


def test_report_unknown_run_is_a_user_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "retro.cli.main", "report", "nope",
                           "--runs", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no run 'nope'" in proc.stderr


# ----------------------------------------------------------- declared results (toy quiz)

@pytest.fixture(scope="module")
def quiz_sweep(tmp_path_factory):
    """A finished `retro run` of the toy quiz (tests/plugins/retro_toy.py) over skill 0 / 2:
    (run folder, the command's stdout)."""
    tmp = tmp_path_factory.mktemp("quiz")
    spec = tmp / "quiz.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "quiz", "recipe": {"type": "toy-quiz", "n": 60},
        "store": {"path": str(tmp / "store"), "runs": str(tmp / "runs")}, "tracking": "none",
        "sweep": {"grid": {"recipe.skill": [0, 2]}}}))
    proc = subprocess.run([sys.executable, "-m", "retro.cli.main", "run", str(spec)], cwd=tmp,
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "RAY_TMPDIR": f"/tmp/rtq{os.getpid() % 100000}"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = (tmp / "runs").iterdir()
    return run_dir, proc.stdout


def _rows(run_dir, name, variant):
    plan = json.loads((run_dir / "plan.json").read_text())
    sid = plan["variants"][variant][name]
    stage = next(s for s in plan["stages"] if s["id"] == sid)
    root = run_dir.parent.parent / "store" / stage["stage"] / stage["key"]
    return {r["qid"]: r for r in map(json.loads,
                                     (root / "graded.jsonl").read_text().splitlines())}


def test_report_pairs_stages_by_what_they_declare(quiz_sweep):
    """The toy's stage names share nothing with the RETRO recipes' (`grade-*`, no `eval-`):
    every pair comes from the declarations (condition, subject, reference) and the sweep."""
    rep = build_report(RunRecord(quiz_sweep[0]))
    found = sorted((c.kind, c.a, c.b, tuple(c.variants)) for c in rep.comparisons
                   if c.metric == "score")
    assert found == sorted([
        ("ablation", "grade-strong-nohint", "grade-strong", ("skill=0",)),
        ("ablation", "grade-strong-nohint", "grade-strong", ("skill=2",)),
        ("subject", "grade-strong", "grade-plain", ("skill=0",)),     # vs the reference arm
        ("subject", "grade-strong", "grade-plain", ("skill=2",)),
        ("variant", "grade-strong [skill=2]", "grade-strong [skill=0]", ("skill=2",)),
        ("variant", "grade-strong-nohint [skill=2]", "grade-strong-nohint [skill=0]",
         ("skill=2",)),
    ])  # grade-plain is shared by both variants: no variant comparison of it
    assert {(r.name, r.metric) for r in rep.headline} == {
        ("grade-strong", "score"), ("grade-strong-nohint", "score"), ("grade-plain", "score")}


def test_report_values_and_intervals_against_hand_computation(quiz_sweep):
    run_dir = quiz_sweep[0]
    rep = build_report(RunRecord(run_dir))
    strong, plain = _rows(run_dir, "grade-strong", "skill=2"), _rows(run_dir, "grade-plain",
                                                                     "skill=2")
    row = next(r for r in rep.headline if r.name == "grade-strong")
    cell = row.cells["skill=2"].estimate
    hand = sum(r["score"] for r in strong.values()) / 60
    assert cell.value == pytest.approx(hand) and cell.n == 60
    # 95% CI of a mean of 60 scores: about 1.96 sd / sqrt(60) either side
    sd = (sum((r["score"] - hand) ** 2 for r in strong.values()) / 60) ** 0.5
    assert cell.hi - cell.lo == pytest.approx(2 * 1.96 * sd / 60 ** 0.5, rel=0.15)

    by = {(c.a, c.b, tuple(c.variants), c.metric): c for c in rep.comparisons}
    vs_plain = by[("grade-strong", "grade-plain", ("skill=2",), "score")]
    assert vs_plain.diff.delta == pytest.approx(
        hand - sum(r["score"] for r in plain.values()) / 60)
    assert vs_plain.diff.lo < 2.0 < vs_plain.diff.hi and vs_plain.verdict == "better"  # truth: 2
    # perplexity-like metric: exp of pooled nll / pooled length, not a mean of ratios
    ppl = by[("grade-strong", "grade-plain", ("skill=2",), "ppl")]
    assert ppl.diff.a == pytest.approx(math.exp(sum(r["nll"] for r in strong.values())
                                                / sum(r["length"] for r in strong.values())))
    assert ppl.verdict == "better" and ppl.diff.delta < 0
    # skill 0: the "strong" learner is as good as the plain one
    same = by[("grade-strong", "grade-plain", ("skill=0",), "score")]
    assert same.diff.lo < 0 < same.diff.hi and same.verdict == "within noise"
    hints = by[("grade-strong-nohint", "grade-strong", ("skill=0",), "score")]
    assert hints.diff.hi < 0 and hints.verdict == "worse"     # hint_bonus 1 minus noise
    # the same learner's noise on both sides: the paired difference is exactly the skill gap
    skill = by[("grade-strong [skill=2]", "grade-strong [skill=0]", ("skill=2",), "score")]
    assert (skill.diff.delta, skill.diff.lo, skill.diff.hi) == pytest.approx((2.0, 2.0, 2.0))


def test_report_opens_with_headline_and_comparisons(quiz_sweep, tmp_path):
    run_dir, stdout = quiz_sweep
    assert "headline" in stdout and "grade-strong" in stdout   # what `retro run` ends with
    assert "within noise" in stdout and "95% CI" in stdout
    rep = write_report(build_report(RunRecord(run_dir)), tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    order = [md.index(h) for h in ("## Headline", "## Comparisons", "## Plots",
                                   "## Evaluation (all metrics)")]
    assert order == sorted(order)
    assert "| grade-strong vs grade-plain | skill=0 | quiz/score |" in md
    assert "within noise" in md and "60 questions" in md
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["bootstrap"]["resamples"] == 10_000
    assert {c["verdict"] for c in data["comparisons"]} >= {"better", "worse", "within noise"}
    names = sorted(p.name for p in rep.plots)
    assert names == ["arms.png", "deltas.png", "headline.png", "metrics.png"]  # 2 arms, 1 base
    for p in rep.plots:
        img = mpimg.imread(p)
        assert p.stat().st_size > 10_000 and img[..., :3].std() > 0.05


def test_platform_report_names_no_stage():
    """The report, its comparisons and plots never name an evaluator's stages."""
    root = Path(retro.platform.report.__file__).parent
    for name in ("report.py", "report_plots.py", "report_arms.py", "comparisons.py",
                 "results.py", "stats.py"):
        text = (root / name).read_text()
        for stage in ("eval-ppl", "eval-qa", "qa-retrieve", "retro-fit", "gpt-fit"):
            assert stage not in text, (name, stage)


def test_pairs_without_a_reference_arm_and_ablations_of_another_subject(tmp_path):
    """RA-DIT-like: four arms, none a reference (all plain LMs) -> each against the first in
    plan order; a closed-book call pairs with the base call of its own model only."""
    from retro.platform.comparisons import Arm, find_pairs
    from retro.platform.results import ItemSet, MetricDecl, Results

    def arm(name, model, contexts, condition=None):
        res = Results(family="f", subject=["model", "contexts"], condition=condition or {},
                      sets=[ItemSet(name="s", file="x.jsonl", metrics={
                          "em": MetricDecl(value="em")})])
        inputs = {"model": model, **({"contexts": contexts} if contexts else {})}
        return Arm(name, name, inputs, res, tmp_path)

    arms = [arm("base", "lm", "r0"), arm("lm-ft", "lm-ft", "r0"), arm("r-ft", "lm", "r1"),
            arm("ra-dit", "lm-ft", "r1"), arm("lm-ft-ctx-off", "lm-ft", None,
                                              {"retrieval_context": False})]
    pairs = find_pairs({a.id: a for a in arms}, {"v": {a.name: a.id for a in arms}})
    assert sorted((k, a, b) for k, a, b, _ in pairs) == [
        ("ablation", "lm-ft-ctx-off", "lm-ft"), ("ablation", "lm-ft-ctx-off", "ra-dit"),
        ("subject", "lm-ft", "base"), ("subject", "r-ft", "base"), ("subject", "ra-dit", "base")]


def test_variants_keep_the_sweep_order_so_the_first_listed_is_the_base():
    from retro.platform.report import spec_order

    top = {"sweep": {"variants": [{"name": "unfrozen", "set": {}}, {"name": "frozen"}]}}
    assert spec_order(["frozen", "unfrozen"], top) == ["unfrozen", "frozen"]  # plan.json sorts
    assert spec_order(["offset=0", "offset=7"], {"sweep": {"grid": {}}}) == ["offset=0",
                                                                              "offset=7"]
