"""Terminal output of the CLI (rich tables, the live stage view)."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.live import Live
from rich.table import Table
import json
from retro.platform.explain import committed
from retro.platform.registry import KINDS
from retro.platform.report import build_report, comparison_rows, fmt, headline_rows
from retro.platform.stats import RESAMPLES
from retro.platform.timeline import critical_path as chain_of, run_span

out = Console()
err = Console(stderr=True)

STATE_STYLE = {"pending": "dim", "running": "yellow", "cached": "cyan", "done": "green",
               "failed": "bold red", "blocked": "magenta"}


def error(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def validated(loaded: Any, plan: Any) -> None:
    spec = loaded.spec
    out.print(f"[green]ok[/] {loaded.path}: spec {spec.name!r}, recipe {spec.recipe.type!r}, "
              f"{len(loaded.variants)} variant(s), {len(plan.stages)} stage(s)")
    for path, value in plan.missing_data:
        out.print(f"[yellow]warning[/] data input {path} = {value} does not exist "
                  "(needed before `retro run`)")


def plan_table(loaded: Any, plan: Any) -> None:
    spec = loaded.spec
    out.print(f"[bold]{spec.name}[/] recipe={spec.recipe.type} variants="
              f"{', '.join(plan.variants)}" + (f"\n{spec.description}" if spec.description
                                               else ""))
    table = Table(show_lines=False)
    for col in ("stage", "key", "status", "resources", "variants", "info"):
        table.add_column(col, overflow="fold")
    for s in plan.stages:
        r = s.resources
        res = f"{r.num_workers}x({r.cpus_per_worker:g} cpu" + \
            (f", {r.gpus_per_worker:g} gpu" if r.gpus_per_worker else "") + ")"
        shared = len(s.variants) == len(plan.variants) and len(plan.variants) > 1
        table.add_row(s.name, s.key[:10], "cached" if s.cached else "to run", res,
                      "all (shared)" if shared else ", ".join(s.variants),
                      "\n".join(f"{k}: {v}" for k, v in s.info.items()))
    out.print(table)
    data_table(plan)
    t = plan.to_json()["totals"]
    out.print(f"{t['stages']} stages: {t['to_run']} to run, {t['cached']} cached, "
              f"{t['shared']} shared by several variants")
    for path, value in plan.missing_data:
        out.print(f"[yellow]missing data[/] {path} = {value}")
    unfit = [s.name for s in plan.stages if str(s.info.get("memory/fits", "")).startswith("NO")]
    if unfit:
        out.print(f"[bold red]will not fit the declared device memory[/]: {', '.join(unfit)} "
                  "(their memory/fits rows say what would)")


def data_table(plan: Any) -> None:
    """The data inputs the stages' keys hash: digest, from the hash cache or hashed now, and
    which stages read each (per stage in `retro plan --json`, `data`)."""
    readers: dict[str, list[str]] = {}
    digests: dict[str, Any] = {}
    for s in plan.stages:
        for loc, d in s.data.items():
            digests.setdefault(loc, d)
            readers.setdefault(loc, [])
            if s.name not in readers[loc]:
                readers[loc].append(s.name)
    if not digests:
        return
    table = Table(show_lines=False)
    for col in ("data input", "sha256", "hash", "read by"):
        table.add_column(col, overflow="fold")
    for loc, d in digests.items():
        pkg = f" ({d.package['name']} {d.package['version']})" if d.package else ""
        table.add_row(loc + pkg, d.sha256[:8] if d.sha256 else "[yellow]missing[/]",
                      "cached" if d.cached else "hashed", ", ".join(readers[loc]))
    out.print(table)


def explain(items: list[dict[str, Any]], depth: int = 0) -> None:
    """`retro plan --explain`: each stage's changed key components, then its changed inputs'."""

    pad = "  " * depth
    for item in items:
        if item["cached"]:
            out.print(f"{pad}[bold]{item['id']}[/] is cached (artifact {item['key'][:10]})")
            continue
        prev = item["previous"]
        out.print(f"{pad}[bold]{item['id']}[/] is not cached" + (
            f"; compared with {item['stage']}/{prev['key'][:10]} (committed "
            f"{committed(prev['committed_at'])})" if prev else ""))
        for change in item["changes"]:
            out.print(f"{pad}  {escape(change)}", highlight=False)
        explain(item["upstream"], depth + 1)


class LiveProgress:
    """A live table of stage states when interactive; one line per event otherwise."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.live = Live(console=err, refresh_per_second=2, transient=False,
                         get_renderable=self._table) if err.is_terminal else None

    def __enter__(self) -> "LiveProgress":
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live:
            self.live.update(self._table())
            self.live.__exit__(*exc)

    def event(self, kind: str, node: Any, extra: dict[str, Any]) -> None:
        row = self.rows.setdefault(node.id, {"name": node.name, "state": kind, "t0": None,
                                             "t1": None})
        row["state"] = kind
        if kind == "started":
            row["state"], row["t0"], row["log"] = "running", time.time(), extra.get("log")
        elif kind in ("done", "failed", "cached", "blocked"):
            row["t1"] = time.time()
        if self.live:
            self.live.update(self._table())
        else:
            extra_text = f" ({extra['error']})" if "error" in extra else ""
            print(f"[{time.strftime('%H:%M:%S')}] {row['state']:8s} {node.id}{extra_text}",
                  file=sys.stderr, flush=True)

    def _table(self) -> Table:
        table = Table("stage", "state", "elapsed", "progress")
        for sid, row in self.rows.items():
            elapsed = ""
            if row["t0"]:
                elapsed = f"{(row['t1'] or time.time()) - row['t0']:.1f}s"
            st = row["state"]
            latest = _last_line(row.get("log")) if st == "running" else ""
            table.add_row(sid, f"[{STATE_STYLE.get(st, '')}]{st}[/]", elapsed, escape(latest))
        return table


def run_summary(record: Any, outcome: Any, plan: Any) -> None:
    counts: dict[str, int] = {}
    for state in outcome.states.values():
        counts[state] = counts.get(state, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    status = "[green]done[/]" if outcome.ok else "[bold red]failed[/]"
    out.print(f"run {record.name} {status}: {summary}\n  folder: {record.dir}")
    for note in record.lock_drift():
        out.print(f"[yellow]reproduction drift[/] {escape(note)}")
    for f in outcome.failures:
        error(str(f))


def runs_table(records: list[Any]) -> None:
    table = Table("run", "status", "stages", "started")
    for r in records:
        st = r.status()
        events = r.events()
        n = sum(1 for e in events if e["event"] in ("done", "cached"))
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.dir.stat().st_mtime))
        table.add_row(r.name, st.get("status", "?"), str(n), started)
    out.print(table)


def run_details(record: Any) -> None:
    plan = json.loads((record.dir / "plan.json").read_text())
    states: dict[str, str] = {}
    for e in record.events():
        if "id" in e:
            states[e["id"]] = e["event"]
    out.print(f"[bold]{record.name}[/] status={record.status().get('status')} ({record.dir})")
    table = Table("stage", "key", "state", "variants")
    for s in plan["stages"]:
        table.add_row(s["name"], s["key"][:10], states.get(s["id"], "pending"),
                      ", ".join(s["variants"]))
    out.print(table)
    critical_path(plan, record.events())


def critical_path(plan: dict[str, Any], events: list[dict[str, Any]]) -> None:
    """The DAG's critical path: the input chain with the longest start→done, each stage's
    time split (its manifest's time_s) and precision."""

    chain = [st for st in chain_of(plan, events) if st.seconds > 0]
    if not chain:
        return
    total, span = sum(st.seconds for st in chain), run_span(events)
    out.print(f"[bold]critical path[/] {total:.1f}s"
              + (f" of the run's {span:.1f}s" if span else "") + ":")
    table = Table("stage", "start→done", "computing", "state", "precision", "time split (s)")
    for st in chain:       # start→done minus computing: waiting for CPUs, loading
        split = ", ".join(f"{k} {v:.1f}" for k, v in
                          sorted(st.time_s.items(), key=lambda kv: -kv[1]))
        table.add_row(st.name, f"{st.seconds:.1f}s",
                      "-" if st.run_seconds is None else f"{st.run_seconds:.1f}s", st.state,
                      st.precision or "-", split or "-")
    out.print(table)


def components_table(registry: Any, kinds: list[str]) -> None:
    for kind in kinds:
        table = Table(title=f"{kind}: {KINDS[kind]}", title_justify="left")
        table.add_column("name")
        table.add_column("description")
        for e in registry.entries(kind):
            table.add_row(e.name + (" (default)" if e.default else ""), e.doc)
        out.print(table)


def component(entry: Any) -> None:
    out.print(f"[bold]{entry.kind} {entry.name}[/]  ({entry.module})\n{entry.doc}")
    cls = entry.config_cls
    if cls is None:
        out.print("(no configuration)")
        return
    table = Table("field", "type", "default", "description")
    for name, f in cls.model_fields.items():
        default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
        ann = getattr(f.annotation, "__name__", None) or str(f.annotation).replace("typing.", "")
        table.add_row(name, ann, default, f.description or "")
    out.print(table)


def diff_table(a: Any, b: Any, rows: list[tuple[str, Any, Any]]) -> None:
    if not rows:
        out.print("no differences")
        return
    table = Table("field", str(a), str(b))
    for path, va, vb in rows:
        table.add_row(path, repr(va), repr(vb))
    out.print(table)


def headline(rep: Any, headline_only: bool = True) -> None:
    """The run's headline metrics with 95% CIs per variant, then every comparison (paired
    bootstrap CI of the difference, "within noise" when it includes 0)."""

    con = out if out.is_terminal else Console(width=220)  # logs and pipes: no wrapped cells
    rows = headline_rows(rep)
    if len(rows) > 1:
        con.print(_rows_table(rows, "headline: value [95% CI] over the items scored"))
    rows = comparison_rows(rep, headline_only=headline_only)
    if len(rows) > 1:
        con.print(_rows_table(rows, f"comparisons: Δ = A − B, paired bootstrap 95% CI "
                                    f"({RESAMPLES:,} resamples)"))


def run_headline(record: Any) -> None:
    """`retro run`'s closing lines: the headline and comparisons of what finished (nothing when
    no stage declared results; a report problem never fails the run)."""

    try:
        rep = build_report(record)
    except Exception as e:  # noqa: BLE001 - the run itself is done; say why and move on
        err.print(f"[yellow]no headline[/]: {escape(str(e))}")
        return
    if rep.headline:
        headline(rep)
        out.print(f"full report: retro report {record.dir}")


def _rows_table(rows: list[list[str]], title: str) -> Table:
    table = Table(*rows[0], title=title, title_justify="left")
    for r in rows[1:]:
        style = "dim" if r[-1] == "within noise" else None
        table.add_row(*map(escape, r), style=style)
    return table


def report(rep: Any) -> None:
    """`retro report`: headline and comparisons with CIs, then the full metric dump (evaluation
    and stage-summary tables), spec differences, files."""

    out.print(f"[bold]{rep.run}[/] spec={rep.spec_name} status={rep.status} "
              f"variants={', '.join(rep.variants)}")
    headline(rep)
    if rep.plots:
        out.print("plots: " + ", ".join(str(p) for p in rep.plots))
    evals = rep.eval_metrics
    for title, names in (("evaluation (all metrics)", evals),
                         ("stage summaries", [m for m in rep.metrics if m not in evals])):
        if not names:
            continue
        table = Table("metric", *rep.variants, title=title, title_justify="left")
        for name in names:
            table.add_row(name, *(fmt(rep.metrics[name].get(v)) for v in rep.variants))
        out.print(table)
    if rep.differences:
        table = Table("field", *rep.variants, title="spec fields that differ",
                      title_justify="left")
        for path, values in rep.differences:
            table.add_row(path, *(repr(values[v]) for v in rep.variants))
        out.print(table)
    out.print(f"report: {rep.markdown}" + "".join(f"\nplot:   {p}" for p in rep.plots))


def _last_line(path: str | None, limit: int = 4096) -> str:
    """The newest line of a stage log (its latest progress message), without the timestamp."""
    if not path:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - limit))
            lines = fh.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].split(" INFO ", 1)[-1][:80] if lines else ""
