"""`retro plan` with content-keyed data (issue 18): the first plan hashes every data input,
later ones take the hashes from the store's stat cache and read no data.

Usage: .venv/bin/python bench/plan_hash.py [SPEC] [--repeat N] [--big-mb MB]
       (default SPEC: specs/retro-tiny.yaml; --big-mb points instruct.blend.0.path at a
       synthetic file of that size, standing in for a large model or corpus)
Prints, for N alternating cold (fresh store) / warm (same store) rounds, the wall time of the
whole `retro plan` command and of `build_plan` in one process, the bytes hashed and the load.
Data files stay in the OS page cache between rounds (nothing drops it), so cold means "hashed
now", not "read from disk".
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RETRO = Path(sys.executable).parent / "retro"


def cli_plan(spec: str, store: Path, extra: list[str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([str(RETRO), "plan", spec, "-o", f"store.path={store}", "--json",
                          *[a for o in extra for a in ("-o", o)]],
                         cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"retro plan failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def in_process(spec: str, store: Path, extra: list[str]) -> tuple[float, int, int]:
    """(seconds, bytes hashed now, data inputs) of one build_plan."""
    from retro.platform.plan import build_plan
    from retro.platform.spec import load_spec
    from retro.platform.store import ArtifactStore

    loaded = load_spec(spec, [f"store.path={store}", *extra])
    t0 = time.perf_counter()
    plan = build_plan(loaded, ArtifactStore(store))
    seconds = time.perf_counter() - t0
    digests = {loc: d for s in plan.stages for loc, d in s.data.items()}
    fresh = {st[0]: st[1] for d in digests.values() if not d.cached for st in d.files}
    return seconds, sum(fresh.values()), len(digests)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec", nargs="?", default="specs/retro-tiny.yaml")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--big-mb", type=int, default=0)
    args = ap.parse_args()
    os.chdir(ROOT)
    from retro.platform.registry import registry

    registry.load_plugins()
    tmp = Path(tempfile.mkdtemp(prefix="retro-plan-hash-"))
    rows: dict[str, list[float]] = {"cli cold": [], "cli warm": [], "build_plan cold": [],
                                    "build_plan warm": []}
    hashed = inputs = 0
    extra = []
    if args.big_mb:
        big = tmp / "big.bin"
        with open(big, "wb") as fh:
            for _ in range(args.big_mb):
                fh.write(os.urandom(1 << 20))
        extra = [f"instruct.blend.0.path={big}"]
    try:
        for i in range(args.repeat):
            store = tmp / f"cli-{i}"
            rows["cli cold"].append(cli_plan(args.spec, store, extra))
            rows["cli warm"].append(cli_plan(args.spec, store, extra))
            store = tmp / f"proc-{i}"
            seconds, hashed, inputs = in_process(args.spec, store, extra)
            rows["build_plan cold"].append(seconds)
            seconds, warm_bytes, _ = in_process(args.spec, store, extra)
            assert warm_bytes == 0, "the warm plan hashed data"
            rows["build_plan warm"].append(seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.spec}: {inputs} data inputs, {hashed / 1e6:.1f} MB hashed by a cold plan, "
          f"0 by a warm one; load average {os.getloadavg()[0]:.1f}")
    for name, values in rows.items():
        print(f"  {name:16s} median {statistics.median(values):.3f} s  "
              f"(runs: {', '.join(f'{v:.3f}' for v in values)})")
    cold, warm = (statistics.median(rows[f"build_plan {k}"]) for k in ("cold", "warm"))
    print(f"  build_plan cold / warm: {cold / warm:.1f}x")


if __name__ == "__main__":
    main()
