"""`retro report` on a real 2-variant sweep: tables, differing spec fields, PNG plots."""

from __future__ import annotations

import json
import subprocess
import sys

import matplotlib.image as mpimg

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


def test_ppl_and_qa_plots_from_eval_stage_summaries(tmp_path):
    from retro.platform.report import Report, StageInfo, _metric_table
    from retro.platform.report_plots import make_plots

    stages = [
        StageInfo("eval-ppl-retro@1", "eval-ppl-retro", "eval-ppl", "1", ["a", "b"], "done",
                  {"ppl": 21.5, "bpb": 1.1}),
        StageInfo("eval-ppl-gpt@2", "eval-ppl-gpt", "eval-ppl", "2", ["a", "b"], "done",
                  {"ppl": 24.0, "bpb": 1.2}),
        StageInfo("eval-qa@3", "eval-qa", "eval-qa", "3", ["a"], "done",
                  {"nq_open/em": 12.0, "nq_open/f1": 20.0, "triviaqa_open/em": 30.0}),
        StageInfo("eval-qa@4", "eval-qa", "eval-qa", "4", ["b"], "done",
                  {"nq_open/em": 15.0, "nq_open/f1": 22.0, "triviaqa_open/em": 31.0}),
        StageInfo("retro-fit@5", "retro-fit", "retro-fit", "5", ["a", "b"], "done", {},
                  {"loss": [(0, 5.0), (10, 4.0), (20, 3.5)], "lr": [(0, 1e-3), (20, 1e-4)]}),
    ]
    plan_variants = {"a": {"eval-ppl-retro": "eval-ppl-retro@1", "eval-ppl-gpt": "eval-ppl-gpt@2",
                           "eval-qa": "eval-qa@3", "retro-fit": "retro-fit@5"},
                     "b": {"eval-ppl-retro": "eval-ppl-retro@1", "eval-ppl-gpt": "eval-ppl-gpt@2",
                           "eval-qa": "eval-qa@4", "retro-fit": "retro-fit@5"}}
    metrics, evals = _metric_table(stages, plan_variants)
    assert metrics["eval-qa/nq_open/em"] == {"a": 12.0, "b": 15.0}
    assert evals[:2] == ["eval-ppl-retro/ppl", "eval-ppl-retro/bpb"]
    rep = Report("r", tmp_path, "done", "s", "", ["a", "b"], stages, metrics, evals, [])
    plots = make_plots(rep, tmp_path)
    assert sorted(p.name for p in plots) == ["curves.png", "metrics.png", "ppl.png", "qa.png"]
    for p in plots:
        img = mpimg.imread(p)
        assert p.stat().st_size > 10_000 and img[..., :3].std() > 0.05
