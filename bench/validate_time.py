"""How long `retro validate` takes, end to end, as a user runs it (fresh process each time).

Usage: .venv/bin/python bench/validate_time.py [SPEC ...]   (default: every spec under specs/)
Target (issue 2): <= 1.5 s on the 2-core dev machine.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RETRO = Path(sys.executable).parent / "retro"


def time_once(spec: Path) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([str(RETRO), "validate", str(spec)], cwd=ROOT, capture_output=True,
                         text=True)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{spec}: validate failed\n{res.stderr}")
    return elapsed


def main() -> None:
    specs = [Path(a) for a in sys.argv[1:]] or sorted((ROOT / "specs").rglob("*.yaml"))
    print(f"{'spec':45s} {'median s':>9s} {'max s':>7s}  (5 runs, fresh process each)")
    for spec in specs:
        times = [time_once(spec) for _ in range(5)]
        print(f"{str(spec.relative_to(ROOT)):45s} {statistics.median(times):9.3f} "
              f"{max(times):7.3f}")


if __name__ == "__main__":
    main()
