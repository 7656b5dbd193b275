"""`retro report`: compare the variants of a run from local files only (no W&B server).

Reads `<run>/plan.json`, `events.jsonl`, the resolved specs (`resolved.yaml`,
`variants/<v>/resolved.yaml`) and, in the store the spec names, each stage's `manifest.json`
summary and `metrics.jsonl` (or the work dir's copy while a stage still runs). Writes
`report.md` (variants x metrics, the spec fields that differ), `report.json` and PNG plots.

Metric names are `<stage name>/<summary key>`, e.g. `eval-ppl-retro/ppl`. Stages whose type
starts with `eval-` or `qa-` are evaluations and come first.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from retro.platform.diffing import flatten
from retro.platform.errors import UserError
from retro.platform.runs import RunRecord, find_runs, resolve_run

EVAL_PREFIXES = ("eval-", "qa-")


@dataclass
class StageInfo:
    """One planned stage as the report sees it."""

    id: str
    name: str
    stage: str
    key: str
    variants: list[str]
    state: str
    summary: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    @property
    def is_eval(self) -> bool:
        return self.stage.startswith(EVAL_PREFIXES)


@dataclass
class Report:
    run: str
    run_dir: Path
    status: str
    spec_name: str
    description: str
    variants: list[str]
    stages: list[StageInfo]
    metrics: dict[str, dict[str, float]]          # metric -> variant -> value
    eval_metrics: list[str]                        # metric names of evaluation stages, in order
    differences: list[tuple[str, dict[str, Any]]]  # dotted spec path -> variant -> value
    plots: list[Path] = field(default_factory=list)
    markdown: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "status": self.status, "spec": self.spec_name,
                "variants": self.variants, "metrics": self.metrics,
                "eval_metrics": self.eval_metrics,
                "differences": [{"path": p, "values": v} for p, v in self.differences],
                "stages": [{"id": s.id, "name": s.name, "stage": s.stage, "key": s.key,
                            "variants": s.variants, "state": s.state, "summary": s.summary}
                           for s in self.stages],
                "plots": [p.name for p in self.plots]}


def find_run(ref: str, runs_dir: Path) -> RunRecord:
    """A run folder, a run name, or a spec/sweep name (its latest run).

    Raises:
        UserError: nothing matches.
    """
    try:
        return resolve_run(ref, runs_dir)
    except UserError:
        latest = [r for r in find_runs(runs_dir) if r.name.startswith(f"{ref}-")]
        if latest:
            return latest[-1]  # find_runs sorts by modification time
        raise


def build_report(record: RunRecord, store: Path | None = None) -> Report:
    """Collect everything the report shows from the run folder and the store.

    Args:
        record: the run.
        store: artifact store root; default: the resolved spec's `store.path`.

    Raises:
        UserError: the folder is not a run (no plan.json / resolved.yaml).
    """
    run_dir = record.dir
    try:
        plan = json.loads((run_dir / "plan.json").read_text())
        top = yaml.safe_load((run_dir / "resolved.yaml").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{run_dir} is not a readable run folder ({e}); "
                        "pass a folder made by `retro run`") from None
    store = Path(store) if store else _store_root(top, run_dir)
    variants = list(plan["variants"])
    states = {e["id"]: e["event"] for e in record.events() if "id" in e}
    stages = [_stage_info(s, states.get(s["id"], "pending"), store) for s in plan["stages"]]
    metrics, eval_names = _metric_table(stages, plan["variants"])
    specs = {v: _variant_spec(run_dir, v, top) for v in variants}
    return Report(record.name, run_dir, record.status().get("status", "unknown"),
                  top.get("name", ""), top.get("description", ""), variants, stages, metrics,
                  eval_names, differences(specs))


def _store_root(top: dict[str, Any], run_dir: Path) -> Path:
    path = Path(top.get("store", {}).get("path", ".retro/store"))
    if path.is_absolute() or path.exists():
        return path
    for base in (run_dir.parent.parent, run_dir.parent.parent.parent):  # runs/ next to .retro/
        if (base / path).exists():
            return base / path
    return path


def _stage_info(s: dict[str, Any], state: str, store: Path) -> StageInfo:
    info = StageInfo(s["id"], s["name"], s["stage"], s["key"], list(s["variants"]), state)
    art = store / s["stage"] / s["key"]
    try:
        info.summary = json.loads((art / "manifest.json").read_text()).get("summary", {})
    except (OSError, ValueError):
        pass
    for path in (art / "metrics.jsonl", store / s["stage"] / ".work" / s["key"] / "metrics.jsonl"):
        if path.exists():
            info.curves = read_curves(path)
            break
    return info


def read_curves(path: Path) -> dict[str, list[tuple[float, float]]]:
    """metrics.jsonl -> {metric: [(step, value), ...]} for numeric values."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for i, line in enumerate(path.read_text().splitlines()):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        step = row.get("step", i)
        for k, v in row.items():
            if k not in ("step", "time") and _is_number(v):
                curves.setdefault(k, []).append((step, float(v)))
    return curves


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _metric_table(stages: list[StageInfo], plan_variants: dict[str, dict[str, str]]
                  ) -> tuple[dict[str, dict[str, float]], list[str]]:
    by_id = {s.id: s for s in stages}
    metrics: dict[str, dict[str, float]] = {}
    evals: list[str] = []
    ordered = sorted(stages, key=lambda s: not s.is_eval)  # evaluations first, stable
    for s in ordered:
        for key, value in s.summary.items():
            if not _is_number(value):
                continue
            name = f"{s.name}/{key}"
            for variant, calls in plan_variants.items():
                if by_id.get(calls.get(s.name, "")) is s:
                    metrics.setdefault(name, {})[variant] = float(value)
            if s.is_eval and name not in evals:
                evals.append(name)
    return metrics, evals


def _variant_spec(run_dir: Path, variant: str, top: dict[str, Any]) -> dict[str, Any]:
    path = run_dir / "variants" / variant / "resolved.yaml"
    data = yaml.safe_load(path.read_text()) if path.exists() else dict(top)
    data.pop("lock", None)
    data.pop("sweep", None)
    return data


def differences(specs: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Dotted spec paths whose resolved values differ between variants."""
    flat = {v: flatten(spec) for v, spec in specs.items()}
    paths = sorted({p for f in flat.values() for p in f})
    out = []
    for p in paths:
        values = {v: f.get(p, "<absent>") for v, f in flat.items()}
        if len({json.dumps(x, sort_keys=True, default=str) for x in values.values()}) > 1:
            out.append((p, values))
    return out


def write_report(report: Report, out_dir: Path) -> Report:
    """Write report.md, report.json and the PNG plots into `out_dir`."""
    from retro.platform.report_plots import make_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    report.plots = make_plots(report, out_dir)
    report.markdown = out_dir / "report.md"
    report.markdown.write_text(to_markdown(report))
    (out_dir / "report.json").write_text(json.dumps(report.to_json(), indent=2, default=str))
    return report


def fmt(value: Any) -> str:
    """Compact number formatting for tables."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4f}".rstrip("0").rstrip(".") if not value.is_integer() else f"{value:g}"
    return str(value)


def to_markdown(report: Report) -> str:
    lines = [f"# Report: {report.run}", "",
             f"spec `{report.spec_name}`, status **{report.status}**, "
             f"{len(report.variants)} variant(s): {', '.join(report.variants)}"]
    if report.description:
        lines += ["", report.description.strip()]
    evals = report.eval_metrics
    others = [m for m in report.metrics if m not in evals]
    for title, names in (("Evaluation", evals), ("Stage summaries", others)):
        if names:
            lines += ["", f"## {title}", "", _md_table(report, names)]
    if report.differences:
        lines += ["", "## Spec fields that differ between variants", "",
                  "| field | " + " | ".join(report.variants) + " |",
                  "|---|" + "---|" * len(report.variants)]
        for path, values in report.differences:
            lines.append(f"| `{path}` | " + " | ".join(
                f"`{json.dumps(values[v], default=str)}`" for v in report.variants) + " |")
    if report.plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in report.plots]
    return "\n".join(lines) + "\n"


def _md_table(report: Report, names: list[str]) -> str:
    head = "| metric | " + " | ".join(report.variants) + " |"
    rows = [head, "|---|" + "---:|" * len(report.variants)]
    for name in names:
        rows.append(f"| {name} | " + " | ".join(
            fmt(report.metrics[name].get(v)) for v in report.variants) + " |")
    return "\n".join(rows)
