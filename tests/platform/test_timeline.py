"""The critical path of a run's DAG, from a constructed plan.json and events.jsonl."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from retro.cli.main import app
from retro.platform.timeline import critical_path, run_span, stage_times


def _stage(sid, inputs=(), cached=False):
    return {"id": sid, "name": sid.split("@")[0], "stage": sid.split("@")[0], "key": sid * 4,
            "variants": ["v"], "cached": cached, "inputs": {f"in{i}": s for i, s in
                                                            enumerate(inputs)}}


def _events(spans, t0=1000.0):
    """{id: (start, done)} -> started/done events (times after t0), in time order."""
    rows = [{"time": t0, "event": "run-started"}]
    for sid, (a, b) in spans.items():
        rows.append({"time": t0 + a, "event": "started", "id": sid})
        rows.append({"time": t0 + b, "event": "done", "id": sid, "seconds": b - a - 0.5,
                     "summary": {"time_s": {"forward": (b - a) / 2, "io": 1.0},
                                 "precision": "bf16"}})
    rows.append({"time": t0 + max(b for _, b in spans.values()), "event": "run-finished",
                 "ok": True})
    return sorted(rows, key=lambda r: r["time"])


# a diamond a -> {b, c} -> d, a cached input f of d, and a long lone stage e:
#   a 0-10, b 10-15, c 10-40, d 40-50, e 0-45.
# Chains by hand: a+b+d = 10+5+10 = 25, a+c+d = 10+30+10 = 50, f+d = 0+10, e = 45.
PLAN = {"stages": [_stage("a@1"), _stage("f@6", cached=True), _stage("b@2", ["a@1"]),
                   _stage("c@3", ["a@1"]), _stage("d@4", ["b@2", "c@3", "f@6"]),
                   _stage("e@5")]}
SPANS = {"a@1": (0, 10), "b@2": (10, 15), "c@3": (10, 40), "d@4": (40, 50), "e@5": (0, 45)}


def test_critical_path_is_the_input_chain_with_the_longest_sum():
    events = _events(SPANS) + [{"time": 1000.0, "event": "cached", "id": "f@6"}]
    chain = critical_path(PLAN, events)
    assert [st.id for st in chain] == ["a@1", "c@3", "d@4"]
    assert [st.seconds for st in chain] == [10.0, 30.0, 10.0]
    assert run_span(events) == 50.0
    times = stage_times(PLAN, events)
    assert times["f@6"].state == "cached" and times["f@6"].seconds == 0.0
    assert times["c@3"].time_s == {"forward": 15.0, "io": 1.0}


def test_a_slow_lone_stage_is_the_critical_path():
    spans = {**SPANS, "e@5": (0, 55)}       # 55 > 50: e alone beats the diamond
    assert [st.id for st in critical_path(PLAN, _events(spans))] == ["e@5"]


def test_a_running_stage_counts_until_now():
    events = [e for e in _events(SPANS) if not (e.get("id") == "d@4" and e["event"] == "done")
              and e["event"] != "run-finished"]
    chain = critical_path(PLAN, events, now=1000.0 + 70)    # d started at 40, still running
    assert [st.id for st in chain] == ["a@1", "c@3", "d@4"]
    assert chain[-1].state == "running" and chain[-1].seconds == 30.0


def test_show_run_prints_the_critical_path(tmp_path):
    run = tmp_path / "runs" / "demo-20260101-000000"
    run.mkdir(parents=True)
    (run / "plan.json").write_text(json.dumps(PLAN))
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in _events(SPANS)))
    (run / "status.json").write_text(json.dumps({"status": "done"}))
    res = CliRunner().invoke(app, ["show", "run", "demo", "--runs", str(tmp_path / "runs")],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "critical path 50.0s of the run's 50.0s" in res.output
    tail = res.output[res.output.index("critical path"):]
    assert [n for n in ("a", "c", "d") if f"│ {n} " in tail] == ["a", "c", "d"]
    assert "│ b " not in tail and "│ e " not in tail
    assert "forward 15.0, io 1.0" in tail
