"""The joint recipe's comparison table from a finished run (docs/joint.md, docs/benchmarks.md).

    python -m bench.joint_table runs/joint-tiny-<stamp> [--dataset nq_open_oracle]

One row per arm: EM and F1 with 95% bootstrap CIs over the same questions (platform/stats.py),
the paired EM difference against the `fixed` arm (the LM trained on a frozen retriever), answer
recall@1/5/k of the retriever the arm ends with (`before` = the base retriever), refreshes and
what they cost, staleness checks and their cost, and the stage's wall time. Prints markdown and
writes `joint_table.json` into the run folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

from retro.platform.stats import Aggregate, interval, paired_difference
from retro.platform.store import ArtifactStore

ARMS = [("base", "independent: nothing trained", None, "qa-retrieve-base"),
        ("fixed", "LM only, frozen retriever", "joint-fixed", "joint-retrieve-fixed"),
        ("sequential", "sequential: RA-DIT (LSR, then RA-IT)", "ra-it", "qa-retrieve-r-ft"),
        ("query-side", "joint, query tower only", "joint-query-side",
         "joint-retrieve-query-side"),
        ("every", "joint, refresh every N", "joint-every", "joint-retrieve-every"),
        ("staleness", "joint, refresh by staleness", "joint-staleness",
         "joint-retrieve-staleness"),
        ("never", "joint, never refreshed", "joint-never", "joint-retrieve-never")]


def load(run: Path) -> tuple[dict, ArtifactStore]:
    plan = json.loads((run / "plan.json").read_text())
    spec = yaml.safe_load((run / "resolved.yaml").read_text())
    return {s["name"]: s for s in plan["stages"]}, ArtifactStore(spec["store"]["path"])


def table(run: Path, dataset: str) -> list[dict]:
    stages, store = load(run)
    art = {n: store.get(s["stage"], s["key"]) for n, s in stages.items()
           if store.exists(s["stage"], s["key"])}
    em = {}
    rows = []
    for arm, regime, train, retrieve in ARMS:
        ev = art.get(f"eval-qa-{arm}")
        if ev is None:
            continue
        preds = [json.loads(x) for x in (ev.path / "predictions" / f"{dataset}.jsonl")
                 .read_text().splitlines() if x.strip()]
        em[arm] = np.array([p["em"] for p in preds], dtype=float)
        f1 = np.array([p["f1"] for p in preds], dtype=float)
        pct = Aggregate(scale=100.0)
        e, f = interval(em[arm], agg=pct), interval(f1, agg=pct)
        r = art[retrieve].manifest["summary"]
        k = max(int(key.split("@")[1]) for key in r if key.startswith(f"{dataset}/recall@"))
        row = {"arm": arm, "regime": regime, "n": e.n,
               "em": [e.value, e.lo, e.hi], "f1": [f.value, f.lo, f.hi],
               "recall": [r[f"{dataset}/recall@{j}"] for j in (1, 5, k)], "k": k,
               "eval_seconds": ev.manifest.get("seconds")}
        if train and train in art:
            s = art[train].manifest["summary"]
            row["train_seconds"] = art[train].manifest.get("seconds")
            if train.startswith("joint-"):
                row.update({key: s.get(key) for key in (
                    "refreshes", "refresh_seconds", "refresh_seconds_mean", "staleness_checks",
                    "staleness_check_seconds", "staleness_min", "staleness_last",
                    "step_seconds_mean", "reader_loss_first_quarter",
                    "reader_loss_last_quarter", "steps_with_refresh_in_flight",
                    "final_refresh_seconds", "initial_index_seconds")})
        rows.append(row)
    for row in rows:
        if "fixed" in em and row["arm"] != "fixed" and len(em[row["arm"]]) == len(em["fixed"]):
            d = paired_difference(em[row["arm"]], em["fixed"], agg=Aggregate(scale=100.0))
            row["em_vs_fixed"] = [d.delta, d.lo, d.hi]
    return rows


def markdown(rows: list[dict]) -> str:
    def ci(v: list[float]) -> str:
        return f"{v[0]:.1f} [{v[1]:.1f}, {v[2]:.1f}]"

    k = rows[0]["k"] if rows else 10
    out = [f"| arm | regime | EM [95% CI] | F1 [95% CI] | ΔEM vs fixed [95% CI] | "
           f"recall@1 / @5 / @{k} | refreshes (s total) | staleness checks (s total, min "
           f"recall) | train s |", "|---" * 9 + "|"]
    for r in rows:
        refresh = "—" if r.get("refreshes") is None else \
            f"{r['refreshes']} ({r['refresh_seconds']:.0f} s)"
        checks = "—" if not r.get("staleness_checks") else \
            f"{r['staleness_checks']} ({r['staleness_check_seconds']:.0f} s, " \
            f"{r['staleness_min']:.2f})"
        train = f"{r['train_seconds']:.0f}" if r.get("train_seconds") else "—"
        delta = ci(r["em_vs_fixed"]) if "em_vs_fixed" in r else "—"
        out.append(f"| {r['arm']} | {r['regime']} | {ci(r['em'])} | {ci(r['f1'])} | {delta} | "
                   f"{' / '.join(f'{x:.0f}' for x in r['recall'])} | {refresh} | {checks} | "
                   f"{train} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--dataset", default="nq_open_oracle")
    a = ap.parse_args()
    rows = table(a.run, a.dataset)
    (a.run / "joint_table.json").write_text(json.dumps(rows, indent=2, default=float))
    print(markdown(rows))


if __name__ == "__main__":
    main()
