"""Bad specs: each gives a located, actionable error, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.platform.helpers import cli

BASE = """\
name: toy
recipe: {type: toy, n: 10}
tracking: none
store: {path: STORE, runs: RUNS}
"""


def write(tmp: Path, text: str, name: str = "spec.yaml") -> Path:
    p = tmp / name
    p.write_text(textwrap.dedent(text).replace("STORE", str(tmp / "store"))
                 .replace("RUNS", str(tmp / "runs")))
    return p


CASES = [
    # id, spec text (appended to BASE unless it starts with '!'), extra args, expected snippets
    ("unknown-top-key", "nmae: x\n", [], ["nmae", "unknown key", "did you mean 'name'", "spec.yaml:5"]),
    ("unknown-component-key", "!name: toy\nrecipe: {type: toy, nn: 3}\ntracking: none\n", [],
     ["recipe.nn", "unknown key", "did you mean 'n'", "spec.yaml:2"]),
    ("wrong-type", "seed: abc\n", [], ["seed", "valid integer", "'abc'", "spec.yaml:5"]),
    ("unknown-component", "!name: toy\nrecipe: {type: toyy}\ntracking: none\n", [],
     ["recipe.type", "unknown recipe component 'toyy'", "did you mean 'toy'", "retro components recipe"]),
    ("constraint", "!name: toy\nrecipe:\n  type: toy\n  n: 0\ntracking: none\n", [],
     ["recipe.n", "greater than or equal to 1", "spec.yaml:4"]),
    ("bad-name", "!name: has space\nrecipe: toy\ntracking: none\n", [],
     ["name", "pattern", "'has space'", "spec.yaml:1"]),
    ("missing-required", "!recipe: toy\ntracking: none\n", [], ["name", "Field required"]),
    ("not-a-mapping", "!- a\n- b\n", [], ["must be a YAML mapping"]),
    ("yaml-syntax", "!name: toy\nrecipe: {type: toy\nseed: 1\n", [], ["YAML syntax error", "spec.yaml:"]),
    ("duplicate-key", "seed: 1\nseed: 2\n", [], ["seed", "duplicate key", "spec.yaml:6"]),
    ("env-unset", "!name: toy\nrecipe: toy\ndescription: ${env:RETRO_TEST_SURELY_UNSET}\ntracking: none\n",
     [], ["description", "RETRO_TEST_SURELY_UNSET is not set", "spec.yaml:3"]),
    ("override-syntax", "", ["-o", "recipe.n"], ["not of the form a.b.c=value"]),
    ("override-type", "", ["-o", "recipe.n=abc"], ["recipe.n", "valid integer", "<-o recipe.n=abc>"]),
    ("override-unknown-key", "", ["-o", "recipe.zzz=1"], ["recipe.zzz", "unknown key", "<-o recipe.zzz=1>"]),
    ("sweep-both-forms", "sweep:\n  grid: {recipe.offset: [1, 2]}\n  variants: [{name: a}]\n", [],
     ["sweep", "exactly one of"]),
    ("sweep-unknown-path", "sweep:\n  grid: {recipe.bogus: [1, 2]}\n", [],
     ["recipe.bogus", "sweep variant", "unknown key"]),
    ("resources-unknown-stage", "resources:\n  stages:\n    scael: {num_workers: 2}\n", [],
     ["resources.stages.scael", "did you mean 'scale'", "spec.yaml:7"]),
    ("unknown-tracker", "!name: toy\nrecipe: toy\ntracking: {type: wandbb}\n", [],
     ["tracking.type", "unknown tracker component", "spec.yaml:3"]),
    ("recipe-check", "!name: toy\nrecipe: {type: toy, fail: nope}\ntracking: none\n", [],
     ["recipe.fail", "not a toy stage", "spec.yaml:2"]),
    ("bad-resources-value", "resources: {default: {num_workers: 0}}\n", [],
     ["resources.default.num_workers", "greater than or equal to 1"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_spec_is_reported_clearly(tmp_path, case):
    _, text, args, expected = case
    spec = write(tmp_path, text[1:] if text.startswith("!") else BASE + text)
    for command in ("validate", "run"):
        res = cli(command, spec, *args, cwd=tmp_path)
        assert res.returncode == 2, (command, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr
        for snippet in expected:
            assert snippet in res.stderr, (snippet, res.stderr)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "store").exists()


def test_all_problems_reported_at_once(tmp_path):
    spec = write(tmp_path, BASE + "seed: abc\nnmae: x\n")
    res = cli("validate", spec, "-o", "recipe.n=-3", cwd=tmp_path)
    assert res.returncode == 2
    assert "3 problems" in res.stderr
    for snippet in ("seed", "nmae", "recipe.n"):
        assert snippet in res.stderr


def test_missing_spec_file(tmp_path):
    res = cli("validate", tmp_path / "nope.yaml", cwd=tmp_path)
    assert res.returncode == 2 and "spec file not found" in res.stderr


def test_cyclic_extends(tmp_path):
    write(tmp_path, "extends: b.yaml\nname: a\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\nseed: 1\n", "b.yaml")
    res = cli("validate", tmp_path / "a.yaml", cwd=tmp_path)
    assert res.returncode == 2
    assert "cyclic extends: a.yaml -> b.yaml -> a.yaml" in res.stderr


def test_missing_extends_file(tmp_path):
    write(tmp_path, "extends: base.yaml\nname: a\n", "a.yaml")
    res = cli("validate", tmp_path / "a.yaml", cwd=tmp_path)
    assert res.returncode == 2
    assert "spec file not found: base.yaml" in res.stderr and "a.yaml" in res.stderr
