"""PNG plots of a `Report` (matplotlib, Agg backend, imported only when plotting).

    curves.png   training curves of every variant on one chart (loss-like series first)
    ppl.png      validation perplexity per model (eval-ppl stages) and variant
    qa.png       QA exact match / F1 per dataset (eval-qa stages), per model and variant
    metrics.png  final evaluation metrics (or stage summaries) per variant, small multiples
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
    for fn in (_curves, _ppl, _qa, _metrics):
        path = fn(report, out_dir)
        if path is not None:
            out.append(path)
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


def _ppl(report: Any, out_dir: Path) -> Path | None:
    stages = [s for s in report.stages if s.stage == "eval-ppl" and "ppl" in s.summary]
    if not stages:
        return None
    return _grouped_bars(report, stages, ["ppl"], out_dir / "ppl.png",
                         "validation perplexity (lower is better)")


def _qa(report: Any, out_dir: Path) -> Path | None:
    """One panel per dataset; per (variant, eval-qa stage) an EM bar and an F1 bar."""
    stages = [s for s in report.stages if s.stage == "eval-qa"]
    datasets = sorted({k.rsplit("/", 1)[0] for s in stages for k in s.summary
                       if k.endswith(("/em", "/f1"))})
    if not datasets:
        return None
    fig, axes = _grid(min(len(datasets), MAX_PANELS), width=max(4.0, 0.9 * len(stages) + 2))
    for ax, ds in zip(axes, datasets):
        rows = [s for s in stages if f"{ds}/em" in s.summary or f"{ds}/f1" in s.summary]
        for j, metric in enumerate(("em", "f1")):
            values = [float(s.summary.get(f"{ds}/{metric}", float("nan"))) for s in rows]
            xs = [i + (j - 0.5) * 0.38 for i in range(len(rows))]
            ax.bar(xs, values, width=0.38, label=metric.upper(), color=f"C{j}")
            for x, v in zip(xs, values):
                ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)), [_label(s, report) for s in rows], rotation=30,
                      ha="right", fontsize=7)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{ds} (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report.run}: zero-shot QA")
    return _save(fig, out_dir / "qa.png")


def _grouped_bars(report: Any, stages: list[Any], keys: list[str], path: Path,
                  title: str) -> Path:
    """One panel per key; one bar per (variant, stage) that has the key."""
    fig, axes = _grid(min(len(keys), MAX_PANELS), width=max(4.0, 0.5 * len(stages) + 2))
    for ax, key in zip(axes, keys):
        bars = [(_label(s, report), float(s.summary[key])) for s in stages if key in s.summary]
        names, values = zip(*bars) if bars else ((), ())
        ax.bar(range(len(values)), values, color=[f"C{i % 10}" for i in range(len(values))])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
        ax.set_title(key)
        ax.set_ylim(bottom=min(0.0, *values) if values else 0.0)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{report.run}: {title}")
    return _save(fig, path)


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
