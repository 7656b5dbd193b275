"""Wall time of a whole `retro run` with a fresh store, per stage, as a user runs it.

Usage: .venv/bin/python bench/e2e_run.py [SPEC] [--keep]
       (default SPEC: specs/retro-tiny.yaml; target for it, issue 7: <= 10 min on 2 cores)
Writes the store and runs under a temporary directory (removed unless --keep) and prints the
total, the per-stage times from the run's events, and the run's report table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RETRO = Path(sys.executable).parent / "retro"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec", nargs="?", default="specs/retro-tiny.yaml")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="retro-e2e-"))
    overrides = ["-o", f"store.path={tmp / 'store'}", "-o", f"store.runs={tmp / 'runs'}"]
    t0 = time.perf_counter()
    res = subprocess.run([str(RETRO), "run", args.spec, *overrides], cwd=ROOT, text=True,
                         capture_output=True)
    total = time.perf_counter() - t0
    print(res.stdout[-2000:])
    if res.returncode != 0:
        print(res.stderr[-4000:])
        raise SystemExit(f"run failed (exit {res.returncode}); files in {tmp}")
    run_dir = next((tmp / "runs").iterdir())
    started: dict[str, float] = {}
    rows = []
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["event"] == "started":
            started[e["id"]] = e["time"]
        elif e["event"] == "done":  # `seconds`: the stage's own run; the rest: waiting for CPUs
            rows.append((e["id"], e["time"] - started.get(e["id"], e["time"]),
                         e.get("seconds", float("nan"))))
    print(f"\n{'stage':40s} {'started->done':>13s} {'ran':>8s}")
    for sid, wall, ran in rows:
        print(f"{sid:40s} {wall:13.1f} {ran:8.1f}")
    print(f"\nTOTAL wall time {total:.0f} s ({total / 60:.1f} min), {len(rows)} stages, "
          f"fresh store; spec {args.spec}")
    rep = subprocess.run([str(RETRO), "report", str(run_dir), "--out", str(tmp / "report")],
                         cwd=ROOT, text=True, capture_output=True)
    print(rep.stdout[-6000:])
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
