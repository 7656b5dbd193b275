"""`retro report`: compare the variants of a run from local files only (no W&B server).

Reads `<run>/plan.json`, `events.jsonl`, the resolved specs (`resolved.yaml`,
`variants/<v>/resolved.yaml`) and, in the store the spec names, each stage's `manifest.json`
summary and `metrics.jsonl` (or the work dir's copy while a stage still runs). Writes
`report.md` (variants x metrics, the spec fields that differ), `report.json` and PNG plots.

The report opens with the headline: every stage that declared per-item results
(`results.json`, see `retro.platform.results`) with its headline metrics and their bootstrap 95%
intervals per variant, then every comparison those declarations imply (ablation vs its base,
subject vs reference, variant vs the first variant) with a paired bootstrap 95% CI of the
difference (`retro.platform.comparisons`). Below: the full dump, metric names
`<stage name>/<summary key>` (stages that declared results first), and the spec fields that
differ. The platform knows no stage names: what a stage declares is all it reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from retro.platform.comparisons import Arm, Comparison, ItemCache, Scored, compare, score_arms
from retro.platform.diffing import flatten
from retro.platform.errors import UserError
from retro.platform.results import Results, read_results
from retro.platform.runs import RunRecord, find_runs, resolve_run
from retro.platform.stats import LEVEL, RESAMPLES
from retro.platform.store import ArtifactStore
from retro.platform.report_arms import ArmRow, arm_rows, arm_table
from retro.platform.report_plots import make_plots


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
    inputs: dict[str, str] = field(default_factory=dict)   # slot -> producing stage id
    results: Results | None = None                          # what the stage declared
    path: Path | None = None                                # its artifact folder
    seconds: float | None = None                            # its run time (manifest)

    @property
    def is_eval(self) -> bool:
        """The stage declared per-item results."""
        return self.results is not None


@dataclass
class HeadlineRow:
    """One headline metric of one call (model / ablation), per variant."""

    name: str
    set: str
    metric: str
    unit: str
    better: str | None
    cells: dict[str, Scored] = field(default_factory=dict)   # variant -> estimate


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
    headline: list[HeadlineRow] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    arms: list[ArmRow] = field(default_factory=list)        # several arms vs one base

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "status": self.status, "spec": self.spec_name,
                "variants": self.variants, "metrics": self.metrics,
                "eval_metrics": self.eval_metrics,
                "bootstrap": {"resamples": RESAMPLES, "level": LEVEL},
                "headline": [{"name": r.name, "set": r.set, "metric": r.metric, "unit": r.unit,
                              "values": {v: {"value": c.estimate.value,
                                             "ci95": [c.estimate.lo, c.estimate.hi],
                                             "n": c.estimate.n} for v, c in r.cells.items()}}
                             for r in self.headline],
                "comparisons": [c.to_json() for c in self.comparisons],
                "arms": [r.to_json() for r in self.arms],
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
    variants = spec_order(list(plan["variants"]), top)
    plan["variants"] = {v: plan["variants"][v] for v in variants}  # the first is the base
    states = {e["id"]: e["event"] for e in record.events() if "id" in e}
    stages = [_stage_info(s, states.get(s["id"], "pending"), store) for s in plan["stages"]]
    metrics, eval_names = _metric_table(stages, plan["variants"])
    specs = {v: _variant_spec(run_dir, v, top) for v in variants}
    rep = Report(record.name, run_dir, record.status().get("status", "unknown"),
                 top.get("name", ""), top.get("description", ""), variants, stages, metrics,
                 eval_names, differences(specs))
    add_statistics(rep, plan["variants"])
    return rep


def spec_order(variants: list[str], top: dict[str, Any]) -> list[str]:
    """Variant names in the order the sweep lists them (plan.json stores them sorted); names the
    sweep does not list (grid points) keep their order, after the listed ones."""
    listed = [v.get("name") for v in (top.get("sweep") or {}).get("variants") or []
              if isinstance(v, dict)]
    first = [v for v in listed if v in variants]
    return first + [v for v in variants if v not in first]


def add_statistics(report: Report, plan_variants: dict[str, dict[str, str]]) -> None:
    """Fill the headline (declared headline metrics with CIs) and the comparisons."""
    arms = {s.id: Arm(s.id, s.name, s.inputs, s.results, s.path)
            for s in report.stages if s.results is not None and s.path is not None}
    cache = ItemCache()
    scored = score_arms(list(arms.values()), cache)
    report.headline = headline(scored, plan_variants)
    comps = compare(arms, plan_variants, cache)
    metric_order = list(dict.fromkeys((c.set, c.metric) for c in comps))
    kinds = {"ablation": 0, "subject": 1, "variant": 2}
    variant_order = {v: i for i, v in enumerate(plan_variants)}
    report.comparisons = sorted(comps, key=lambda c: (
        metric_order.index((c.set, c.metric)), kinds[c.kind],
        min(variant_order.get(v, 0) for v in c.variants or [""])))
    report.arms = arm_rows(report.stages, scored, report.comparisons)


def headline(scored: list[Scored], plan_variants: dict[str, dict[str, str]]
             ) -> list[HeadlineRow]:
    """Rows (call, set, metric) of the headline metrics, a cell per variant that ran it.
    A set that marks no metric as headline shows its first one."""
    marked = {(s.stage_id, s.set) for s in scored if s.decl.headline}
    by_stage: dict[str, list[Scored]] = {}
    seen: set[tuple[str, str]] = set()
    for s in scored:
        k = (s.stage_id, s.set)
        if s.decl.headline or (k not in marked and k not in seen):
            by_stage.setdefault(s.stage_id, []).append(s)
        seen.add(k)
    rows: dict[tuple[str, str, str], HeadlineRow] = {}
    for variant, calls in plan_variants.items():
        for name, sid in calls.items():
            for s in by_stage.get(sid, []):
                row = rows.setdefault((name, s.set, s.metric), HeadlineRow(
                    name, s.set, s.metric, s.unit, s.decl.better))
                row.cells[variant] = s
    return list(rows.values())


def _store_root(top: dict[str, Any], run_dir: Path) -> Path:
    path = Path(top.get("store", {}).get("path", ".retro/store"))
    if path.is_absolute() or path.exists():
        return path
    for base in (run_dir.parent.parent, run_dir.parent.parent.parent):  # runs/ next to .retro/
        if (base / path).exists():
            return base / path
    return path


def _stage_info(s: dict[str, Any], state: str, store: Path) -> StageInfo:
    info = StageInfo(s["id"], s["name"], s["stage"], s["key"], list(s["variants"]), state,
                     inputs=dict(s.get("inputs", {})))
    artifacts = ArtifactStore(store)
    art = artifacts.path(s["stage"], s["key"])
    try:
        manifest = json.loads((art / "manifest.json").read_text())
        info.summary, info.seconds = manifest.get("summary", {}), manifest.get("seconds")
        info.path, info.results = art, read_results(art)
    except (OSError, ValueError):
        pass
    for path in (art / "metrics.jsonl",
                 artifacts.work_path(s["stage"], s["key"]) / "metrics.jsonl"):
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
    if report.headline:
        lines += ["", "## Headline", "", f"Value [bootstrap {LEVEL:.0%} CI over items, "
                  f"{RESAMPLES:,} resamples]; n = items scored.", "",
                  _md_rows(headline_rows(report))]
    if report.comparisons:
        lines += ["", "## Comparisons", "", f"Δ = A − B on the items both scored, paired "
                  f"bootstrap {LEVEL:.0%} CI ({RESAMPLES:,} resamples, seeded); \"within "
                  "noise\" when the CI includes 0.", "",
                  _md_rows(comparison_rows(report))]
    if report.arms:
        lines += ["", "## Arms against one base: quality and cost", "",
                  "Each arm (e.g. a retrieval-LM family) against the base it is paired with: "
                  "paired bootstrap CI of the relative Δ; cost beside the base: the arm's "
                  "`*_per_token` summary counts, the stages it needs that the base does not "
                  "(their artifact bytes and seconds) and which of them train.", "",
                  _md_rows(arm_table(report.arms, report.variants, fmt_ci, sig))]
    if report.plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in report.plots]
    evals = report.eval_metrics
    others = [m for m in report.metrics if m not in evals]
    for title, names in (("Evaluation (all metrics)", evals), ("Stage summaries", others)):
        if names:
            lines += ["", f"## {title}", "", _md_table(report, names)]
    if report.differences:
        lines += ["", "## Spec fields that differ between variants", "",
                  "| field | " + " | ".join(report.variants) + " |",
                  "|---|" + "---|" * len(report.variants)]
        for path, values in report.differences:
            lines.append(f"| `{path}` | " + " | ".join(
                f"`{json.dumps(values[v], default=str)}`" for v in report.variants) + " |")
    return "\n".join(lines) + "\n"


def _md_table(report: Report, names: list[str]) -> str:
    head = "| metric | " + " | ".join(report.variants) + " |"
    rows = [head, "|---|" + "---:|" * len(report.variants)]
    for name in names:
        rows.append(f"| {name} | " + " | ".join(
            fmt(report.metrics[name].get(v)) for v in report.variants) + " |")
    return "\n".join(rows)


def sig(value: float, digits: int = 4) -> str:
    """`value` to `digits` significant digits, no exponent below 1e6 (`934.6`, `0.05512`)."""
    if not math.isfinite(value):
        return "–"
    if value == 0:
        return "0"
    if abs(value) >= 1e6:
        return f"{value:.{digits - 1}e}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def fmt_ci(value: float, lo: float, hi: float, digits: int = 4) -> str:
    """`21.34 [20.91, 21.80]`: `digits` significant digits of the largest of the three, the
    same decimals for all."""
    if not all(map(math.isfinite, (value, lo, hi))):
        return sig(value, digits)
    top = max(abs(value), abs(lo), abs(hi))
    decimals = max(0, digits - 1 - math.floor(math.log10(top))) if top else 0
    return f"{value:.{decimals}f} [{lo:.{decimals}f}, {hi:.{decimals}f}]"


def headline_rows(report: Report) -> list[list[str]]:
    """Header + one row per headline (call, set, metric): value [CI] per variant, n."""
    out = [["stage", "metric", *report.variants, "n"]]
    for r in report.headline:
        ns = sorted({c.estimate.n for c in r.cells.values()})
        arrow = {"lower": " ↓", "higher": " ↑"}.get(r.better or "", "")
        out.append([r.name, f"{r.set}/{r.metric}{arrow}", *(
            fmt_ci(c.estimate.value, c.estimate.lo, c.estimate.hi) if (c := r.cells.get(v))
            else "–" for v in report.variants),
            "/".join(map(str, ns)) + f" {r.unit}"])
    return out


def comparison_rows(report: Report, headline_only: bool = False) -> list[list[str]]:
    """Header + one row per comparison: A, B, Δ [CI], relative Δ, n, verdict."""
    out = [["A vs B", "variants", "metric", "A", "B", "Δ [95% CI]", "Δ %", "n", "verdict"]]
    keep = {(r.set, r.metric) for r in report.headline}
    every = set(report.variants)
    for c in report.comparisons:
        if headline_only and (c.set, c.metric) not in keep:
            continue
        d = c.diff
        where = "all" if set(c.variants) == every else ", ".join(c.variants)
        # relative differences for pooled ratios (ppl, bpb); means (EM, F1) in absolute points
        rel = "–"
        if c.decl.aggregate != "mean" and d.b > 0 and math.isfinite(d.rel_lo + d.rel_hi):
            text = fmt_ci(100 * d.rel, 100 * d.rel_lo, 100 * d.rel_hi, 3)
            rel = ("" if d.rel < 0 else "+") + text.replace(" [", "% [", 1)
        delta = fmt_ci(d.delta, d.lo, d.hi, 3)
        out.append([f"{c.a} vs {c.b}", where, f"{c.set}/{c.metric}", sig(d.a, 5), sig(d.b, 5),
                    delta if d.delta < 0 else "+" + delta, rel, f"{d.n} {c.unit}", c.verdict])
    return out


def _md_rows(rows: list[list[str]]) -> str:
    head, body = rows[0], rows[1:]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)
