"""How wide the report's paired 95% CIs are with the first n items, for every comparison of a run.

    .venv/bin/python bench/ci_width.py runs/<run> [--n 16 32 64 128] [--metric ppl]

Reads what `retro report` reads (the run's plan and the stages' declared per-item results),
recomputes each comparison of `--metric` on the first n paired items, and prints the delta and
its CI half-width per n: the evidence for how many sequences / questions an evaluator needs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from retro.platform.comparisons import Arm, ItemCache
from retro.platform.report import build_report, sig
from retro.platform.runs import RunRecord
from retro.platform.stats import paired_difference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--n", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--metric", default="ppl")
    args = ap.parse_args()
    rep = build_report(RunRecord(args.run))
    arms = {s.id: Arm(s.id, s.name, s.inputs, s.results, s.path)
            for s in rep.stages if s.results is not None}
    cache = ItemCache()
    print(f"| comparison | variants | {args.metric}: Δ% ± CI half-width at n = "
          + ", ".join(map(str, args.n)) + " |")
    print("|---|---|" + "---|")
    for c in rep.comparisons:
        if c.metric != args.metric:
            continue
        a, b = arms[c.a_id], arms[c.b_id]
        sa = next(s for s in a.results.sets if s.name == c.set)
        sb = next(s for s in b.results.sets if s.name == c.set)
        rows_a, rows_b = cache.rows(a, sa), cache.rows(b, sb)
        ids = [i for i in rows_a if i in rows_b]
        cells = []
        for n in args.n:
            if n > len(ids):
                cells.append("–")
                continue
            num_a, den_a = c.decl.columns([rows_a[i] for i in ids[:n]])
            num_b, den_b = c.decl.columns([rows_b[i] for i in ids[:n]])
            d = paired_difference(num_a, num_b, den_a, den_b, c.decl.agg)
            half = 100 * (d.rel_hi - d.rel_lo) / 2
            cells.append(f"{100 * d.rel:+.2f}% ± {sig(half, 2)}"
                         + (" (noise)" if d.within_noise else ""))
        print(f"| {c.a} vs {c.b} | {', '.join(c.variants)} | " + " / ".join(cells) + " |")


if __name__ == "__main__":
    main()
