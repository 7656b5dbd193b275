"""Per-item results a stage declares, so `retro report` can compare stages it knows nothing of.

A stage that scores items (sequences, questions, ...) writes its per-item scores as JSONL and a
`results.json` beside them in its artifact (`write_results(ctx.out_dir, Results(...))`):

    {"family": "ppl/3f2a...",               # only results of one family are compared
     "subject": ["model"],                  # input slots holding what was evaluated
     "condition": {"encoder": false},       # switches set away from the evaluator's own ({}: base)
     "reference": false,                    # true: the arm others are measured against
     "sets": [{"name": "valid", "file": "per_sequence.jsonl", "id": "seq",
               "source": "<key of the items' artifact>", "unit": "sequences",
               "metrics": {"ppl": {"aggregate": "exp-ratio", "num": "nll", "den": "tokens",
                                   "better": "lower", "headline": true}}}]}

How the report pairs stages (in `report.py`, by these fields only, never by stage names):
- an ablation against its base: same family and subject inputs, a non-empty `condition` vs `{}`;
- one subject against another (Retro vs GPT): same family and condition, different subject
  inputs; measured against the `reference` arm (or, when none or all are, the first in the plan);
- one sweep variant against the first: the same call computed with a different key.
Items pair by their `id` column within sets of equal `name` and `source`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from retro.platform.stats import Aggregate

RESULTS_FILE = "results.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MetricDecl(_Strict):
    """One metric over a set's items: g(sum(num) / sum(den)) as in `retro.platform.stats`."""

    aggregate: Literal["mean", "ratio", "exp-ratio"] = "mean"
    value: Optional[str] = None
    """Column averaged by `mean`."""
    num: Optional[str] = None
    """Numerator column of `ratio` / `exp-ratio` (e.g. nll)."""
    den: Optional[str] = None
    """Denominator column of `ratio` / `exp-ratio` (e.g. tokens, bytes)."""
    scale: float = 1.0
    """Multiplies the aggregate (100 for %, 1/ln 2 for bits)."""
    better: Optional[Literal["higher", "lower"]] = None
    headline: bool = False
    """Shown first (`retro run`'s closing table, the top of `retro report`)."""

    @model_validator(mode="after")
    def _columns(self) -> "MetricDecl":
        if self.aggregate == "mean" and not self.value:
            raise ValueError("a mean metric names its `value` column")
        if self.aggregate != "mean" and not (self.num and self.den):
            raise ValueError(f"a {self.aggregate} metric names its `num` and `den` columns")
        return self

    @property
    def agg(self) -> Aggregate:
        return Aggregate(self.aggregate, self.scale)

    def columns(self, rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """(num, den) arrays of these rows."""
        if self.aggregate == "mean":
            num = np.array([float(r[self.value]) for r in rows])
            return num, np.ones_like(num)
        return (np.array([float(r[self.num]) for r in rows]),
                np.array([float(r[self.den]) for r in rows]))


class ItemSet(_Strict):
    """Items scored together (one dataset, one split), one JSONL line per item."""

    name: str
    file: str
    """JSONL file, relative to the artifact."""
    id: str = "id"
    """Column naming the item; equal ids on both sides of a comparison are the same item."""
    source: str = ""
    """Identity of the items (e.g. the key of the artifact they come from); sets pair only
    when their sources are equal."""
    unit: str = "items"
    metrics: dict[str, MetricDecl]


class Results(_Strict):
    family: str
    subject: list[str] = []
    condition: dict[str, Any] = {}
    reference: bool = False
    sets: list[ItemSet]


def write_results(out_dir: Path, results: Results) -> Path:
    """Declare the per-item results of a stage (its item files are written by the stage)."""
    path = Path(out_dir) / RESULTS_FILE
    path.write_text(json.dumps(results.model_dump(mode="json"), indent=2))
    return path


def read_results(artifact_dir: Path) -> Results | None:
    """The declaration of a committed artifact, or None (no file, or one this code can't read)."""
    try:
        return Results.model_validate_json((Path(artifact_dir) / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return None


def read_items(artifact_dir: Path, item_set: ItemSet) -> dict[str, dict[str, Any]]:
    """id -> row of a set's JSONL file, in file order (unreadable lines are skipped)."""
    rows: dict[str, dict[str, Any]] = {}
    try:
        text = (Path(artifact_dir) / item_set.file).read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and item_set.id in row:
            rows[str(row[item_set.id])] = row
    return rows
