"""PNG plots of a `Report` (matplotlib, Agg backend, imported only when plotting).

    headline.png  every headline metric a stage declared (per-item results): one panel per
                  (item set, metric), a point per (stage, variant) with its 95% CI
    deltas.png    every comparison of a headline metric: relative difference A / B - 1 for
                  pooled ratios (ppl), the difference A - B for means (EM), with its paired 95%
                  CI; 0 is marked
    curves.png    training curves of every variant on one chart (loss-like series first)
    metrics.png   final evaluation metrics (or stage summaries) per variant, small multiples
    arms.png      the arms table (several arms vs one base, e.g. retrieval-LM families): the
                  headline metric per arm and its relative Δ vs the base, 95% CIs, the arms
                  that needed training marked
    <stage>-<f>   figures a stage drew itself and listed in its summary (`figures: [f]`),
                  e.g. joint-train's loss / staleness / refresh plot

Like the report, the plots know no stage names: they draw what stages declared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MAX_PANELS = 12


def make_plots(report: Any, out_dir: Path) -> list[Path]:
    """Every plot the report's data supports; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    out = []
    for fn in (_headline, _deltas, _arms, _curves, _metrics):
        path = fn(report, out_dir)
        if path is not None:
            out.append(path)
    return out + _stage_figures(report, out_dir)


def _stage_figures(report: Any, out_dir: Path) -> list[Path]:
    """Figures a stage drew itself and named in its summary (`figures: [file, ...]` of its
    artifact, e.g. joint-train's loss + staleness plot), copied as `<stage name>-<file>`."""
    import shutil

    out = []
    for stage in report.stages:
        for name in stage.summary.get("figures") or []:
            src = Path(stage.path or "") / str(name)
            if stage.path is not None and src.is_file() and Path(name).name == name:
                dst = out_dir / f"{stage.name}-{name}"
                shutil.copyfile(src, dst)
                out.append(dst)
    return out


def _label(stage: Any, report: Any) -> str:
    who = stage.variants[0] if len(stage.variants) == 1 else \
        ("all" if len(stage.variants) == len(report.variants) else "+".join(stage.variants))
    return f"{who}: {stage.name}" if len(report.variants) > 1 else stage.name


def _curves(report: Any, out_dir: Path) -> Path | None:
    series = [(s, k, pts) for s in report.stages for k, pts in s.curves.items() if len(pts) > 1]
    if not series:
        return None
    lossy = [x for x in series if "loss" in x[1].lower()]
    series = lossy or series
    keys = list(dict.fromkeys(k for _, k, _ in series))[:MAX_PANELS]
    fig, axes = _grid(len(keys), width=6.0)
    for ax, key in zip(axes, keys):
        for stage, k, pts in series:
            if k == key:
                steps, values = zip(*pts)
                ax.plot(steps, values, label=_label(stage, report), linewidth=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report.run}: training curves")
    return _save(fig, out_dir / "curves.png")


def _headline(report: Any, out_dir: Path) -> Path | None:
    """One panel per (set, metric); a point per (stage, variant), whiskers = the 95% CI (points,
    not bars: close values such as perplexities stay apart when the axis does not start at 0)."""
    panels: dict[tuple[str, str], list[Any]] = {}
    for row in report.headline:
        panels.setdefault((row.set, row.metric), []).append(row)
    if not panels:
        return None
    keys = list(panels)[:MAX_PANELS]
    bars = max(len(rows) * len(report.variants) for rows in panels.values())
    fig, axes = _grid(len(keys), width=max(5.5, 0.6 * bars + 2))
    for ax, key in zip(axes, keys):
        labels, values, errs, colors = [], [], [[], []], []
        for i, row in enumerate(panels[key]):
            for v in report.variants:
                cell = row.cells.get(v)
                if cell is None:
                    continue
                e = cell.estimate
                labels.append(f"{row.name}" + (f" [{v}]" if len(report.variants) > 1 else ""))
                values.append(e.value)
                errs[0].append(max(e.value - e.lo, 0.0))
                errs[1].append(max(e.hi - e.value, 0.0))
                colors.append(f"C{report.variants.index(v) % 10}")
        for x, (value, lo, hi, color) in enumerate(zip(values, *errs, colors)):
            ax.errorbar([x], [value], yerr=[[lo], [hi]], fmt="o", capsize=4, color=color)
            ax.annotate(f"{value:.4g}", (x, value), xytext=(6, 0), textcoords="offset points",
                        fontsize=7, va="center")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_xlim(-0.5, len(values) - 0.5)
        better = panels[key][0].better
        ax.set_title(f"{key[0]}/{key[1]}" + (f" ({better} is better)" if better else ""),
                     fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{report.run}: headline metrics, 95% bootstrap CI")
    return _save(fig, out_dir / "headline.png")


def _deltas(report: Any, out_dir: Path) -> Path | None:
    """A forest plot of the comparisons of headline metrics, one panel per (set, metric)."""
    keep = {(r.set, r.metric) for r in report.headline}
    panels: dict[tuple[str, str], list[Any]] = {}
    for c in report.comparisons:
        if (c.set, c.metric) in keep:
            panels.setdefault((c.set, c.metric), []).append(c)
    if not panels:
        return None
    keys = list(panels)[:MAX_PANELS]
    rows = max(len(cs) for cs in panels.values())
    import matplotlib.pyplot as plt

    cols, nrows = 1, len(keys)   # one column: the long "A vs B" labels need the left margin
    fig, axes = plt.subplots(nrows, cols, figsize=(10, (0.35 * rows + 1.4) * nrows),
                             squeeze=False)
    flat = [ax for r in axes for ax in r]
    for ax in flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(flat, keys):
        cs = panels[key]
        rel = all(c.decl.aggregate != "mean" and c.diff.b > 0 for c in cs)
        for y, c in enumerate(cs):
            d = c.diff
            mid, lo, hi = ((100 * d.rel, 100 * d.rel_lo, 100 * d.rel_hi) if rel
                           else (d.delta, d.lo, d.hi))
            color = "0.6" if c.diff.within_noise else ("C2" if c.verdict == "better" else "C3")
            ax.errorbar([mid], [y], xerr=[[max(mid - lo, 0)], [max(hi - mid, 0)]], fmt="o",
                        color=color, capsize=3)
        ax.axvline(0.0, color="k", linewidth=0.8)
        where = lambda c: "" if len(c.variants) == len(report.variants) or \
            c.kind == "variant" else f" ({', '.join(c.variants)})"
        ax.set_yticks(range(len(cs)), [f"{c.a} vs {c.b}{where(c)}" for c in cs], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("A / B - 1 (%)" if rel else "A - B")
        ax.set_title(f"{key[0]}/{key[1]}: grey = within noise", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{report.run}: differences, paired bootstrap 95% CI")
    return _save(fig, out_dir / "deltas.png")


def _metrics(report: Any, out_dir: Path) -> Path | None:
    names = report.eval_metrics or list(report.metrics)
    names = [n for n in names if report.metrics.get(n)][:MAX_PANELS]
    if not names:
        return None
    fig, axes = _grid(len(names), width=max(3.5, 0.7 * len(report.variants) + 2))
    for ax, name in zip(axes, names):
        values = [report.metrics[name].get(v, float("nan")) for v in report.variants]
        ax.bar(range(len(values)), values, color=[f"C{i % 10}" for i in range(len(values))])
        ax.set_xticks(range(len(values)), report.variants, rotation=30, ha="right", fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{report.run}: final metrics per variant")
    return _save(fig, out_dir / "metrics.png")


def _arms(report: Any, out_dir: Path) -> Path | None:
    rows = getattr(report, "arms", [])
    if not rows:
        return None
    import matplotlib.pyplot as plt

    metric = next((m for m, e in rows[0].estimates.items() if e.decl.headline),
                  next(iter(rows[0].estimates), None))
    if metric is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.8), sharey=True)
    labels = []
    for y, r in enumerate(rows):
        trained = bool(r.training)
        label = r.name + ("" if set(r.variants) == set(report.variants)
                          else f" [{', '.join(r.variants)}]") + (" (trained)" if trained else "")
        labels.append(label)
        e = r.estimates.get(metric)
        if e is not None:
            v = e.estimate
            left.errorbar([v.value], [y], xerr=[[max(v.value - v.lo, 0)], [max(v.hi - v.value, 0)]],
                          fmt="s" if trained else "o", capsize=3, color="C1" if trained else "C0")
        if r.versus is not None:
            d = r.versus.diff
            mid, lo, hi = 100 * d.rel, 100 * d.rel_lo, 100 * d.rel_hi
            color = "0.6" if d.within_noise else ("C2" if r.versus.verdict == "better" else "C3")
            right.errorbar([mid], [y], xerr=[[max(mid - lo, 0)], [max(hi - mid, 0)]], fmt="o",
                           color=color, capsize=3)
            right.annotate(f"vs {r.versus.b}", (mid, y), xytext=(6, 4),
                           textcoords="offset points", fontsize=6)
    left.set_yticks(range(len(rows)), labels, fontsize=7)
    left.invert_yaxis()
    left.set_xlabel(f"{metric} (95% CI)")
    left.grid(alpha=0.3)
    right.axvline(0.0, color="k", linewidth=0.8)
    right.set_xlabel(f"Δ {metric} vs base, % (paired 95% CI)")
    right.grid(alpha=0.3)
    fig.suptitle(f"{report.run}: arms vs {rows[0].name}")
    return _save(fig, out_dir / "arms.png")


def _grid(n: int, width: float) -> tuple[Any, list[Any]]:
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 3.6 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
