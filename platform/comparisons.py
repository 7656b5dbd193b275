"""Which stages `retro report` compares, and the paired bootstrap CI of every comparison.

Stages are found by their `results.json` declaration (`retro.platform.results`), never by name:
an ablation against its base, one subject against the reference (Retro vs GPT), and each sweep
variant against the first variant. Every aggregate and every difference carries a seeded
bootstrap 95% interval over the items both sides scored (`retro.platform.stats`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from retro.platform.results import ItemSet, MetricDecl, Results, read_items
from retro.platform.stats import Difference, Estimate, interval, paired_difference

Kind = Literal["ablation", "subject", "variant"]
MIN_ITEMS = 2


@dataclass
class Arm:
    """A stage that declared results, as the comparison logic needs it."""

    id: str
    name: str
    inputs: dict[str, str]
    results: Results
    path: Path

    def subject(self) -> dict[str, str | None]:
        return {slot: self.inputs.get(slot) for slot in self.results.subject}


@dataclass
class Scored:
    """One declared metric of one stage over all of its items."""

    stage_id: str
    name: str
    set: str
    metric: str
    unit: str
    decl: MetricDecl
    estimate: Estimate


@dataclass
class Comparison:
    """a - b for one metric, on the items both scored."""

    kind: Kind
    a: str
    b: str
    a_id: str
    b_id: str
    set: str
    metric: str
    unit: str
    decl: MetricDecl
    diff: Difference
    variants: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.diff.within_noise:
            return "within noise"
        if self.decl.better is None:
            return "higher" if self.diff.delta > 0 else "lower"
        up = self.diff.delta > 0
        return "better" if up == (self.decl.better == "higher") else "worse"

    def to_json(self) -> dict[str, Any]:
        d = self.diff
        return {"kind": self.kind, "a": self.a, "b": self.b, "a_id": self.a_id,
                "b_id": self.b_id, "set": self.set, "metric": self.metric, "n": d.n,
                "unit": self.unit, "a_value": d.a, "b_value": d.b, "delta": d.delta,
                "ci95": [d.lo, d.hi], "rel": d.rel, "rel_ci95": [d.rel_lo, d.rel_hi],
                "verdict": self.verdict, "variants": self.variants}


class ItemCache:
    """Per-item rows of each (artifact, set), read once."""

    def __init__(self) -> None:
        self._rows: dict[tuple[Path, str], dict[str, dict[str, Any]]] = {}

    def rows(self, arm: Arm, item_set: ItemSet) -> dict[str, dict[str, Any]]:
        k = (arm.path, item_set.name)
        if k not in self._rows:
            self._rows[k] = read_items(arm.path, item_set)
        return self._rows[k]


def score_arms(arms: list[Arm], cache: ItemCache) -> list[Scored]:
    """Every declared metric of every arm with its bootstrap interval."""
    out = []
    for arm in arms:
        for s in arm.results.sets:
            rows = list(cache.rows(arm, s).values())
            if len(rows) < MIN_ITEMS:
                continue
            for metric, decl in s.metrics.items():
                try:
                    num, den = decl.columns(rows)
                except (KeyError, TypeError, ValueError):
                    continue  # a column the declaration names is missing
                out.append(Scored(arm.id, arm.name, s.name, metric, s.unit, decl,
                                  interval(num, den, decl.agg)))
    return out


def find_pairs(arms: dict[str, Arm], variants: dict[str, dict[str, str]]
               ) -> list[tuple[Kind, str, str, list[str]]]:
    """(kind, a id, b id, variants) of every comparison the declarations imply.

    `arms` in plan (topological) order; `variants` (variant -> call -> stage id) with the base
    variant first."""
    pairs: dict[tuple[str, str], tuple[Kind, list[str]]] = {}
    for variant, calls in variants.items():
        ids = set(calls.values())
        present = [a for a in arms.values() if a.id in ids]   # `arms` is in plan order
        for a, b, kind in _within_variant(present):
            pairs.setdefault((a.id, b.id), (kind, []))[1].append(variant)
    names = list(variants)
    for variant in names[1:]:
        base = variants[names[0]]
        for call, i in variants[variant].items():
            j = base.get(call)
            if i in arms and j in arms and i != j \
                    and arms[i].results.family == arms[j].results.family:
                pairs.setdefault((i, j), ("variant", []))[1].append(variant)
    return [(kind, a, b, vs) for (a, b), (kind, vs) in pairs.items()]


def _within_variant(arms: list[Arm]) -> list[tuple[Arm, Arm, Kind]]:
    out = []
    for a in arms:
        for b in arms:
            if a is b or a.results.family != b.results.family:
                continue
            if a.results.condition and not b.results.condition and _same_subject(a, b):
                out.append((a, b, "ablation"))
    groups: dict[tuple[str, str], list[Arm]] = {}
    for a in arms:
        cond = repr(sorted(a.results.condition.items()))
        groups.setdefault((a.results.family, cond), []).append(a)
    for group in groups.values():
        refs = [a for a in group if a.results.reference]
        if not refs or len(refs) == len(group):
            refs = group[:1]
        for b in refs:
            for a in group:
                if a not in refs and a.subject() != b.subject():
                    out.append((a, b, "subject"))
    return _unique(out)


def _same_subject(a: Arm, b: Arm) -> bool:
    """The same thing was evaluated: equal producers in every subject slot both have."""
    sa, sb = a.subject(), b.subject()
    shared = [s for s in sa if sa[s] is not None and sb.get(s) is not None]
    return bool(shared) and all(sa[s] == sb[s] for s in shared)


def _unique(pairs: list[tuple[Arm, Arm, Kind]]) -> list[tuple[Arm, Arm, Kind]]:
    seen, out = set(), []
    for a, b, kind in pairs:
        if (a.id, b.id) not in seen and (b.id, a.id) not in seen:
            seen.add((a.id, b.id))
            out.append((a, b, kind))
    return out


def compare(arms: dict[str, Arm], variants: dict[str, dict[str, str]],
            cache: ItemCache) -> list[Comparison]:
    """The paired difference of every shared (set, metric) of every pair `find_pairs` finds.
    Sides are named by their call names; a variant comparison names the variants too."""
    out = []
    base = next(iter(variants), "")
    for kind, ia, ib, vs in find_pairs(arms, variants):
        a, b = arms[ia], arms[ib]
        la, lb = (f"{a.name} [{vs[0]}]", f"{b.name} [{base}]") if kind == "variant" \
            else (a.name, b.name)
        sets_b = {(s.name, s.source): s for s in b.results.sets}
        for sa in a.results.sets:
            sb = sets_b.get((sa.name, sa.source))
            if sb is None:
                continue
            rows_a, rows_b = cache.rows(a, sa), cache.rows(b, sb)
            ids = [i for i in rows_a if i in rows_b]
            if len(ids) < MIN_ITEMS:
                continue
            for metric, decl in sa.metrics.items():
                if sb.metrics.get(metric) != decl:
                    continue
                try:
                    a_num, a_den = decl.columns([rows_a[i] for i in ids])
                    b_num, b_den = decl.columns([rows_b[i] for i in ids])
                except (KeyError, TypeError, ValueError):
                    continue
                diff = paired_difference(a_num, b_num, a_den, b_den, decl.agg)
                out.append(Comparison(kind, la, lb, ia, ib, sa.name, metric, sa.unit, decl,
                                      diff, vs))
    return out
