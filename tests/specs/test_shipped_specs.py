"""Every shipped spec validates and plans, so a broken spec cannot land."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from retro.platform import api
from tests.platform.helpers import cli

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "specs").rglob("*.yaml"))


def test_there_are_shipped_specs():
    names = {p.relative_to(ROOT / "specs").as_posix() for p in SPECS}
    assert {"retro-tiny.yaml", "ablations/freeze.yaml", "instructretro-48b.yaml"} <= names


@pytest.mark.parametrize("spec", SPECS, ids=[p.relative_to(ROOT).as_posix() for p in SPECS])
def test_spec_validates_and_plans(spec, tmp_path):
    res = cli("validate", spec, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    res = cli("plan", spec, "--json", "-o", f"store.path={tmp_path / 'store'}", cwd=ROOT)
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["totals"]["stages"] > 0


@pytest.mark.parametrize("spec", SPECS, ids=[p.relative_to(ROOT).as_posix() for p in SPECS])
def test_spec_opens_with_a_header(spec):
    lines = spec.read_text().splitlines()
    header = [ln for ln in lines[:8] if ln.startswith("#")]
    assert 3 <= len(header) <= 8, f"{spec.name}: 3-6 line header comment expected"


def test_freeze_sweep_shares_every_retrieval_stage():
    loaded, plan = api.validate(ROOT / "specs" / "ablations" / "freeze.yaml")
    assert [v.name for v in loaded.variants] == ["unfrozen", "frozen"]
    shared = {s.name for s in plan.stages if len(s.variants) == 2}
    assert {"tokenize", "chunk-db", "embed", "train-index", "fill-index", "neighbours-train",
            "neighbours-valid", "gpt-pretrain", "qa-retrieve"} <= shared
    per_variant = {s.name for s in plan.stages if len(s.variants) == 1}
    assert {"retro-fit", "instruct-retro"} <= per_variant


def test_48b_plan_shows_size_layers_and_cost():
    res = cli("plan", ROOT / "specs" / "instructretro-48b.yaml", "--json", cwd=ROOT)
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    fit = next(s for s in plan["stages"] if s["name"] == "retro-fit")["info"]
    assert fit["params"].startswith("48.")
    assert "(14)" in fit["cca_layers"] and fit["cca_layers"].startswith("9,12")
    hours = int(re.match(r"([\d,]+)", fit["gpu_hours"]).group(1).replace(",", ""))
    assert 0.8 * 69_995 < hours < 1.2 * 69_995 and "69,995" in fit["paper"]
    assert any(m["path"] == "model.init" for m in plan["missing_data"])


def test_readme_commands_are_the_ci_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert "bash .ci/setup && .venv/bin/retro run specs/retro-tiny.yaml" in blocks
    test_cmd = "bash .ci/setup && .venv/bin/python -m pytest -q"
    assert test_cmd in blocks
    assert test_cmd in (ROOT / ".ci" / "run").read_text()
