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
