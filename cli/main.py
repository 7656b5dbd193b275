"""`retro` command line: thin typer commands over `retro.platform`.

Exit codes: 0 success, 1 a stage failed, 2 user error (bad spec, bad input, bad arguments).
Heavy libraries (torch, ray, transformers) are imported only by commands that run stages.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import typer

from retro.cli import render
from retro.platform.errors import RetroError, StageFailed, UserError
import click
from retro.platform import api
from retro.platform.diffing import diff_specs
from retro.platform.registry import KINDS, close_matches, registry
from retro.platform.report import build_report, find_run, write_report
from retro.platform.runs import find_runs
from retro.platform.spec.jsonschema import spec_json_schema
from retro.platform.spec.reference import spec_reference
from retro.platform.store import ArtifactStore

app = typer.Typer(name="retro", pretty_exceptions_show_locals=False, no_args_is_help=True,
                  add_completion=False, rich_markup_mode=None,
                  help="Declarative experiments for retrieval-augmented LM training.")

OVERRIDES = typer.Option([], "-o", "--override", help="Set a spec field: -o a.b.c=value "
                         "(value parsed as YAML: ints, floats, bools, lists, null).")
SPECS_DIR = Path(__file__).resolve().parent.parent / "specs"


def main() -> None:
    """Console entry point: user errors exit 2 with a message and no traceback."""
    try:
        code = app(standalone_mode=False, prog_name="retro")  # Exit codes are returned here
        sys.exit(code if isinstance(code, int) else 0)
    except UserError as e:
        render.error(str(e))
        sys.exit(2)
    except StageFailed as e:
        render.error(str(e))
        sys.exit(2 if e.user_error else 1)
    except RetroError as e:
        render.error(str(e))
        sys.exit(1)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except KeyboardInterrupt:
        render.error("interrupted; re-run the same command to resume")
        sys.exit(130)
    except Exception as e:  # usage errors arrive here in non-standalone mode
        if _is_click_error(e):
            e.show()
            sys.exit(2)
        raise


def _is_click_error(e: Exception) -> bool:
    """Click's ClickException, or the copy of it that newer typer releases vendor."""

    try:
        from typer._click.exceptions import ClickException as TyperClickException
    except ImportError:  # typer with a click dependency instead of a vendored copy
        TyperClickException = click.ClickException
    return isinstance(e, (click.ClickException, TyperClickException))


@app.command()
def validate(spec: Path, override: list[str] = OVERRIDES) -> None:
    """Check a spec (schema, components, cross-field rules). Nothing runs or is written."""

    loaded, plan = api.validate(spec, override)
    render.validated(loaded, plan)


@app.command()
def plan(spec: Path, override: list[str] = OVERRIDES,
         as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
         explain: Optional[str] = typer.Option(None, "--explain", metavar="STAGE", help=(
             "Why STAGE is not cached: the key components (params, data, version, inputs) "
             "that changed since its last artifact in the store."))) -> None:
    """Show the DAG: stages, keys, cached or to run, resources, variants, estimates, and the
    content hash of each data input (from the hash cache or hashed now)."""

    loaded, the_plan = api.plan(spec, override)
    if explain is not None:
        from retro.platform.explain import explain as explain_stage
        from retro.platform.store import ArtifactStore

        items = explain_stage(the_plan, ArtifactStore(loaded.spec.store.path), explain)
        if as_json:
            print(json.dumps(items, indent=2, default=str))
        else:
            render.explain(items)
    elif as_json:
        print(json.dumps(the_plan.to_json(), indent=2, default=str))
    else:
        render.plan_table(loaded, the_plan)


@app.command()
def run(spec: Path, override: list[str] = OVERRIDES,
        rerun: list[str] = typer.Option([], "--rerun", help="Recompute this stage even if "
                                        "its artifact exists (repeatable).")) -> None:
    """Run a spec (or a run folder / its resolved.yaml, to reproduce it). Resumes by itself."""

    with render.LiveProgress() as live:
        record, outcome, the_plan = api.run(spec, override, argv=sys.argv, on_event=live.event,
                                            rerun=rerun)
    render.run_summary(record, outcome, the_plan)
    render.run_headline(record)
    if not outcome.ok:
        user = all(f.user_error for f in outcome.failures)
        raise typer.Exit(2 if user else 1)


@app.command("ls")
def ls_runs(runs: Path = typer.Option(Path("runs"), help="Runs directory.")) -> None:
    """List runs with their status."""

    render.runs_table(find_runs(runs))


@app.command()
def show(what: str = typer.Argument(..., help="`run` or a registry kind (e.g. index)"),
         name: str = typer.Argument(...),
         runs: Path = typer.Option(Path("runs"), help="Runs directory.")) -> None:
    """`retro show run <id>`: a run's stages; `retro show <kind> <name>`: a config schema."""
    if what == "run":
        from retro.platform.runs import resolve_run

        render.run_details(resolve_run(name, runs))
        return

    registry.load_plugins()
    render.component(registry.get(what, name))


@app.command()
def components(kind: Optional[str] = typer.Argument(None, help="Registry kind.")) -> None:
    """List registered components (all kinds, or one) with their one-line docs."""

    registry.load_plugins()
    if kind is not None and kind not in KINDS:
        close = close_matches(kind, KINDS)
        raise UserError(f"unknown registry kind {kind!r}"
                        + (f"; did you mean {close[0]!r}?" if close else "")
                        + f" Kinds: {', '.join(KINDS)}")
    render.components_table(registry, [kind] if kind else list(KINDS))


@app.command()
def schema() -> None:
    """Print the JSON Schema of specs (for the YAML language server)."""

    print(json.dumps(spec_json_schema(), indent=2))


@app.command()
def docs() -> None:
    """Print the Markdown reference of every spec field (docs/spec.md)."""

    print(spec_reference(), end="")


@app.command()
def diff(a: Path, b: Path) -> None:
    """Show the resolved fields that differ between two specs or runs."""

    render.diff_table(a, b, diff_specs(a, b))


@app.command()
def report(run: str = typer.Argument(..., help="Run folder, run name, or spec/sweep name "
                                     "(its latest run)."),
           out: Optional[Path] = typer.Option(None, help="Output folder; default <run>/report."),
           runs: Path = typer.Option(Path("runs"), help="Runs directory."),
           store: Optional[Path] = typer.Option(None, help="Artifact store; default: the "
                                                "run's store.path.")) -> None:
    """Compare a run's variants: metrics table (terminal + report.md), spec differences, plots."""

    record = find_run(run, runs)
    rep = write_report(build_report(record, store), out or record.dir / "report")
    render.report(rep)


@app.command()
def gc(runs: Path = typer.Option(Path("runs"), help="Runs whose artifacts are kept."),
       store: Path = typer.Option(Path(".retro/store"), help="Artifact store root."),
       dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would go.")) -> None:
    """Delete artifacts no run references (and leftovers of interrupted writes)."""

    referenced = set()
    for record in find_runs(runs):
        plan_data = json.loads((record.dir / "plan.json").read_text())
        referenced |= {(s["stage"], s["key"]) for s in plan_data["stages"]}
    garbage = ArtifactStore(store).garbage(referenced)
    for path in garbage:
        print(("would remove " if dry_run else "removed ") + str(path))
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True)
    print(f"{len(garbage)} item(s){' (dry run)' if dry_run else ''}")


@app.command()
def cp(builtin: str = typer.Argument(..., help="Built-in spec, e.g. retro-tiny"),
       dest: Path = typer.Argument(...)) -> None:
    """Copy a built-in spec to edit it."""
    names = sorted(str(p.relative_to(SPECS_DIR).with_suffix("")) for p in SPECS_DIR.rglob(
        "*.yaml"))
    src = SPECS_DIR / f"{builtin.removesuffix('.yaml')}.yaml"
    if not src.is_file():
        raise UserError(f"no built-in spec {builtin!r}; built-ins: {', '.join(names)}")
    if dest.exists():
        raise UserError(f"{dest} exists; choose another destination")
    shutil.copy(src, dest)
    print(f"copied {src.name} -> {dest}")
if __name__ == "__main__":
    main()
