"""Break a rag-eval run's QA scores down by whether a gold answer was in the prompt.

    .venv/bin/python bench/rag_eval_breakdown.py runs/rag-eval-smollm2-<time>

Reads only the run folder and the store (eval-qa predictions, qa-retrieve contexts); prints a
Markdown table per (variant, eval-qa stage, dataset): n, EM, F1, the share of questions whose
top `passages` retrieved passages (that variant's retriever) hold a gold answer, and EM / F1 on
those questions and on the others. Closed-book rows are split by the same passages, so the
closed-book and RAG rows of one variant compare the same questions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(run_dir: Path) -> None:
    plan = json.loads((run_dir / "plan.json").read_text())
    top = yaml.safe_load((run_dir / "resolved.yaml").read_text())
    store = Path(top["store"]["path"])
    by_id = {s["id"]: s for s in plan["stages"]}
    passages = top["eval"][0].get("passages", 5)
    print("| variant | stage | dataset | n | EM | F1 | answer in prompt % | EM / F1 with it |"
          " EM / F1 without |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for variant, calls in plan["variants"].items():
        stages = [by_id[sid] | {"call": name} for name, sid in sorted(calls.items())]
        in_prompt = {}  # (dataset, id) -> a gold answer is in this variant's top passages
        for s in (s for s in stages if s["stage"] == "qa-retrieve"):
            for f in sorted((store / s["stage"] / s["key"] / "contexts").glob("*.jsonl")):
                for row in _jsonl(f):
                    rank = row["answer_rank"]
                    in_prompt[(f.stem, row["id"])] = rank is not None and rank < passages
        for s in (s for s in stages if s["stage"] == "eval-qa"):
            for f in sorted((store / s["stage"] / s["key"] / "predictions").glob("*.jsonl")):
                rows = _jsonl(f)
                hit = [r for r in rows if in_prompt.get((f.stem, r["id"]), False)]
                miss = [r for r in rows if not in_prompt.get((f.stem, r["id"]), False)]
                print(f"| {variant} | {s['call']} | {f.stem} | {len(rows)} | {_m(rows, 'em')} | "
                      f"{_m(rows, 'f1')} | {100 * len(hit) / max(len(rows), 1):.1f} | "
                      f"{_m(hit, 'em')} / {_m(hit, 'f1')} | {_m(miss, 'em')} / {_m(miss, 'f1')} |")


def _m(rows: list[dict], key: str) -> str:
    return f"{100 * sum(r[key] for r in rows) / len(rows):.1f}" if rows else "–"


if __name__ == "__main__":
    main(Path(sys.argv[1]))
