"""The W&B tracker: offline runs read back with W&B's own reader, mode resolution, secrets."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from retro.components.trackers.wandb_tracker import resolve_mode
from retro.platform.secrets import redact
from tests.tracking.conftest import SECRET


def leet(path: Path, *args: str) -> str:
    """`wandb leet inspect` (W&B 0.31's reader of .wandb transaction logs)."""
    exe = shutil.which("wandb") or str(Path(sys.executable).parent / "wandb")
    proc = subprocess.run([exe, "leet", "inspect", *args, str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@functools.lru_cache(maxsize=4)
def wandb_runs(run_dir: Path) -> dict[str, list[dict]]:
    """job_type -> {"summary": ..., "records": [...]} for every offline W&B run of a retro run."""
    out = {}
    for d in sorted((run_dir / "wandb").glob("offline-run-*")):
        summary = json.loads(leet(d, "--summary", "--json"))
        records = [json.loads(line) for line in leet(d, "--json").splitlines() if line.strip()]
        run = next(r["run"] for r in records if r["type"] == "run")
        out.setdefault(run["job_type"], []).append({"summary": summary, "records": records,
                                                    "run": run})
    return out


def test_one_offline_wandb_run_per_stage_execution(tracked_sweep):
    runs = wandb_runs(tracked_sweep)
    # source and scale are shared by both variants (one execution each); total runs twice
    assert {k: len(v) for k, v in runs.items()} == {"source": 1, "scale": 1, "total": 2}
    for group in runs.values():
        for r in group:
            assert r["run"]["run_group"] == tracked_sweep.name     # group = the run / sweep
            assert r["run"]["project"] == "retro-tests"
            assert r["summary"]["state"] == "finished"
    (scale,) = runs["scale"]
    assert sorted(scale["run"]["tags"]) == ["offset=0", "offset=7"]


def test_config_is_the_resolved_spec_of_the_variant(tracked_sweep):
    totals = wandb_runs(tracked_sweep)["total"]
    by_variant = {r["summary"]["config"]["retro"]["variants"][0]: r for r in totals}
    assert set(by_variant) == {"offset=0", "offset=7"}
    for variant, offset in (("offset=0", 0), ("offset=7", 7)):
        config = by_variant[variant]["summary"]["config"]
        assert config["recipe"] == {"type": "toy", "n": 10, "factor": 2, "offset": offset,
                                    "sleep": 0.0, "fail": None, "label": "", "miswire": None}
        assert config["tracking"][0]["mode"] == "offline"
        assert config["retro"]["stage"] == "total"
        # summary metric logged at the end of the stage
        assert by_variant[variant]["summary"]["summary"]["total"] == 90 + offset


def test_metrics_are_streamed_as_history_rows(tracked_sweep):
    (scale,) = wandb_runs(tracked_sweep)["scale"]
    rows = [r["history"]["item"] for r in scale["records"] if r["type"] == "history"]
    # toy-scale logs value = 2 * i at steps 0, 1, 2 (one row per ctx.log_metrics call)
    assert [(row["step"], row["value"]) for row in rows] == [(0, 0), (1, 2), (2, 4)]


def test_stage_outputs_are_reference_artifacts_with_lineage(tracked_sweep):
    runs = wandb_runs(tracked_sweep)
    plan = json.loads((tracked_sweep / "plan.json").read_text())
    keys = {s["name"]: s["key"] for s in plan["stages"]}
    (scale,) = runs["scale"]
    (art,) = [r["artifact"] for r in scale["records"] if r["type"] == "artifact"]
    assert art["name"] == f"toy-scale-{keys['scale'][:16]}" and art["type"] == "toy-scale"
    meta = json.loads(art["metadata"])
    assert meta["key"] == keys["scale"]
    assert meta["inputs"] == {"numbers": f"toy-source/{keys['source']}"}
    refs = {e["ref"] for e in art["manifest"]["contents"]}
    assert any(ref.endswith(f"/toy-scale/{keys['scale']}/numbers.npy") for ref in refs)


def test_api_key_never_lands_in_any_file(tracked_sweep):
    roots = [tracked_sweep, tracked_sweep.parent.parent / "store"]
    files = [p for root in roots for p in root.rglob("*") if p.is_file()]
    assert len(files) > 20 and any(p.suffix == ".wandb" for p in files)
    leaks = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert leaks == []


@pytest.mark.parametrize("mode, env, expected", [
    ("auto", {}, "offline"),
    ("auto", {"WANDB_API_KEY": "k" * 40}, "online"),
    ("auto", {"WANDB_API_KEY": "k" * 40, "WANDB_MODE": "offline"}, "offline"),
    ("auto", {"WANDB_MODE": "disabled"}, "disabled"),
    ("auto", {"WANDB_MODE": "dryrun"}, "offline"),
    ("offline", {"WANDB_API_KEY": "k" * 40}, "offline"),
    ("disabled", {"WANDB_MODE": "online"}, "disabled"),
])
def test_mode_resolution(mode, env, expected, tmp_path):
    env = {"NETRC": str(tmp_path / "no-netrc"), **env}
    assert resolve_mode(mode, env) == expected


def test_redact_hides_secret_keys_and_values_but_not_tokenizers():
    data = {"tokenizer": {"type": "bpe", "max_tokens": 5}, "api_key": "abc",
            "nested": [{"hf_token": "x"}], "description": f"uses {SECRET} inline"}
    out = redact(data, secrets=[SECRET])
    assert out["tokenizer"] == {"type": "bpe", "max_tokens": 5}
    assert out["api_key"] == "<redacted>" and out["nested"][0]["hf_token"] == "<redacted>"
    assert out["description"] == "uses <redacted> inline"
