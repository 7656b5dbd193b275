"""CLI verbs: help text, introspection, schema, ls/show/diff/gc/cp."""

from __future__ import annotations

import json

import pytest

from retro.platform import api
from tests.platform.helpers import cli, toy_spec


def test_help_lists_every_command():
    res = cli("--help")
    assert res.returncode == 0
    for verb in ("validate", "plan", "run", "ls", "show", "components", "schema", "diff", "gc",
                 "cp"):
        assert verb in res.stdout


def test_components_and_show(tmp_path):
    res = cli("components", "recipe")
    assert res.returncode == 0 and "toy" in res.stdout and "Three chained" in res.stdout
    res = cli("show", "recipe", "toy")
    assert res.returncode == 0 and "factor" in res.stdout and "Multiplier" in res.stdout
    res = cli("show", "recipe", "toyy")
    assert res.returncode == 2 and "did you mean 'toy'" in res.stderr
    res = cli("components", "recipes")
    assert res.returncode == 2 and "did you mean 'recipe'" in res.stderr


@pytest.mark.parametrize("args,message", [
    (("components", "recipe", "stage"), "Got unexpected extra argument"),
    (("validate",), "Missing argument"),
    (("bogus",), "No such command"),
])
def test_usage_errors_exit_2_with_usage_and_no_traceback(args, message):
    res = cli(*args)
    assert res.returncode == 2 and message in res.stderr and "Usage: retro" in res.stderr
    assert "Traceback" not in res.stderr


def test_schema_covers_registered_components():
    res = cli("schema")
    assert res.returncode == 0
    schema = json.loads(res.stdout)
    assert "recipe" in schema["properties"] and "node-recipe" in schema["$defs"]
    assert "Multiplier applied by the scale stage" in json.dumps(schema["$defs"])
    assert schema["properties"]["recipe"]["$ref"] == "#/$defs/node-recipe"


def test_plan_json_marks_cached_after_a_run(tmp_path, ray_session):
    spec = toy_spec(tmp_path)
    before = json.loads(cli("plan", spec, "--json", cwd=tmp_path).stdout)
    assert before["totals"] == {"stages": 3, "to_run": 3, "cached": 0, "shared": 0}
    api.run(spec)
    after = json.loads(cli("plan", spec, "--json", cwd=tmp_path).stdout)
    assert after["totals"]["cached"] == 3
    table = cli("plan", spec, cwd=tmp_path).stdout
    assert "cached" in table and "offset: 0" in table  # estimate() info column


def test_ls_show_diff_gc_and_reproduce(tmp_path, ray_session):
    spec = toy_spec(tmp_path)
    record, outcome, _ = api.run(spec)
    runs = tmp_path / "runs"
    res = cli("ls", "--runs", runs)
    assert res.returncode == 0 and record.name in res.stdout and "done" in res.stdout
    res = cli("show", "run", record.name, "--runs", runs)
    assert res.returncode == 0 and "total" in res.stdout
    other = toy_spec(tmp_path, "other", recipe={"type": "toy", "factor": 5})
    res = cli("diff", spec, other)
    assert res.returncode == 0 and "recipe.factor" in res.stdout and "name" in res.stdout
    res = cli("diff", record.dir, spec)  # a run vs its own spec
    assert res.returncode == 0 and "no differences" in res.stdout
    # reproducing from the run folder computes nothing new
    _, outcome2, _ = api.run(record.dir / "resolved.yaml")
    assert set(outcome2.states.values()) == {"cached"}
    lock = (record.dir / "resolved.yaml").read_text()
    assert "packages:" in lock and "git:" in lock
    # gc: an artifact no run references goes; referenced ones stay
    stray = tmp_path / "store" / "toy-total" / ("f" * 32)
    stray.mkdir()
    (stray / "manifest.json").write_text("{}")
    res = cli("gc", "--runs", runs, "--store", tmp_path / "store", "--dry-run")
    assert str(stray) in res.stdout and stray.exists()
    res = cli("gc", "--runs", runs, "--store", tmp_path / "store")
    assert not stray.exists() and "1 item" in res.stdout
    kept = [p for p in (tmp_path / "store" / "toy-total").iterdir() if not p.name.startswith(".")]
    assert len(kept) == 1


def test_cp_copies_a_builtin(tmp_path):
    res = cli("cp", "nope", tmp_path / "x.yaml")
    assert res.returncode == 2 and "no built-in spec" in res.stderr


def test_reproducing_a_run_reports_lock_drift(tmp_path, ray_session):
    import yaml

    record, _, _ = api.run(toy_spec(tmp_path))
    resolved = yaml.safe_load((record.dir / "resolved.yaml").read_text())
    resolved["lock"]["packages"]["numpy"] = "0.0.1"
    tampered = tmp_path / "tampered.yaml"
    tampered.write_text(yaml.safe_dump(resolved))
    record2, outcome, _ = api.run(tampered)
    assert outcome.ok
    assert any("numpy: locked 0.0.1" in note for note in record2.lock_drift())
    assert record.lock_drift() == []
