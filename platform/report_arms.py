"""The report's arms table: several arms measured against one base, with what each costs.

When one arm is the base (B) of two or more comparisons (the `families` recipe: in-context RALM,
kNN-LM and RETRO against the no-retrieval LM), the report adds a table with, per arm: its
declared metrics with their 95% CIs, the paired relative difference against its base, and its
cost beside the base, all read from what the stages recorded (never from stage names):

- per scored token: the arm's summary entries ending in `_per_token` (e.g. an evaluator's
  `searches_per_token`, `forward_tokens_per_token`);
- one-off: the stages the arm depends on and its base does not (its datastore, its index, its
  training), with their artifact bytes (summary `bytes`) and seconds (manifest `seconds`);
- training: those of them that train (their summary counts `steps`), with steps (× the
  global batch in sequences, or the `tokens` they report) and seconds; "none" when the arm
  needs no training beyond its base.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from retro.platform.comparisons import Comparison, Scored

MIN_ARMS = 2


@dataclass
class ArmRow:
    """One arm: its estimates, its comparison with its base, and its extra cost."""

    stage_id: str
    name: str
    variants: list[str]
    estimates: dict[str, Scored] = field(default_factory=dict)   # metric -> estimate
    versus: Comparison | None = None                              # headline metric vs base
    also: list[Comparison] = field(default_factory=list)          # vs other arms (controls)
    per_token: dict[str, float] = field(default_factory=dict)
    extra_bytes: int = 0
    extra_seconds: float = 0.0
    extra_stages: list[str] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"stage_id": self.stage_id, "name": self.name, "variants": self.variants,
                "metrics": {m: {"value": s.estimate.value, "ci95": [s.estimate.lo,
                                                                    s.estimate.hi]}
                            for m, s in self.estimates.items()},
                "versus": self.versus.to_json() if self.versus else None,
                "also": [c.to_json() for c in self.also],
                "per_token": self.per_token, "extra_bytes": self.extra_bytes,
                "extra_seconds": self.extra_seconds, "extra_stages": self.extra_stages,
                "training": self.training}


def arm_rows(stages: list[Any], scored: list[Scored], comparisons: list[Comparison]
             ) -> list[ArmRow]:
    """The base with the most arms compared against it (at least MIN_ARMS), then its arms and
    the arms compared against those (e.g. an encoder-off ablation of RETRO), in plan order.
    Empty when no base has that many."""
    direct = [c for c in comparisons if c.kind in ("ablation", "subject")]
    heads = {(c.set, c.metric) for c in direct if c.decl.headline}
    direct = [c for c in direct if (c.set, c.metric) in heads]
    against: dict[str, list[Comparison]] = {}
    for c in direct:
        against.setdefault(c.b_id, []).append(c)
    if not against:
        return []
    base = max(against, key=lambda b: len({c.a_id for c in against[b]}))
    if len({c.a_id for c in against[base]}) < MIN_ARMS:
        return []
    by_id = {s.id: s for s in stages}
    order = {s.id: i for i, s in enumerate(stages)}
    members, versus, also = [base], {}, {}
    grown = True
    while grown:   # arms of the base, then arms of those arms, ...
        grown = False
        for c in sorted(direct, key=lambda c: (order.get(c.a_id, 0), c.b_id != base)):
            if c.b_id in members and c.a_id not in members:
                members.append(c.a_id)
                versus[c.a_id] = c
                grown = True
    for c in direct:   # an arm's other comparisons (e.g. RETRO vs its no-retrieval control)
        if c.a_id in members and c.a_id != base and c is not versus.get(c.a_id):
            also.setdefault(c.a_id, []).append(c)
            if c.b_id not in members:
                members.append(c.b_id)
    rows = []
    for sid in [base] + sorted(members[1:], key=lambda i: order.get(i, 0)):
        stage = by_id[sid]
        row = ArmRow(sid, stage.name, list(stage.variants),
                     {s.metric: s for s in scored if s.stage_id == sid},
                     versus.get(sid), also.get(sid, []))
        row.per_token = {k: float(v) for k, v in stage.summary.items()
                         if k.endswith("_per_token") and isinstance(v, (int, float))}
        if sid != base:   # what it needs beyond the base
            _extra_cost(row, by_id, base)
        rows.append(row)
    return rows


def ancestors(stage_id: str, by_id: dict[str, Any]) -> set[str]:
    """Every stage `stage_id` reads, transitively (itself excluded)."""
    seen: set[str] = set()
    todo = list(by_id[stage_id].inputs.values()) if stage_id in by_id else []
    while todo:
        sid = todo.pop()
        if sid in seen or sid not in by_id:
            continue
        seen.add(sid)
        todo += list(by_id[sid].inputs.values())
    return seen


def _extra_cost(row: ArmRow, by_id: dict[str, Any], base_id: str) -> None:
    """What `row`'s arm needs that the base does not: stages, bytes, seconds, training."""
    extra = ancestors(row.stage_id, by_id) - ancestors(base_id, by_id) - {base_id}
    for sid in sorted(extra, key=lambda i: list(by_id).index(i)):
        s = by_id[sid]
        row.extra_stages.append(s.name)
        row.extra_bytes += int(s.summary.get("bytes", 0) or 0)
        row.extra_seconds += float(s.seconds or 0.0)
        if "steps" in s.summary:
            row.training.append({"stage": s.name, "steps": s.summary.get("steps"),
                                 "global_batch": s.summary.get("global_batch"),
                                 "tokens": s.summary.get("tokens"), "seconds": s.seconds})


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def arm_table(rows: list[ArmRow], variants: list[str], fmt_ci: Any, sig: Any
              ) -> list[list[str]]:
    """Header + one row per arm for the markdown report."""
    base = rows[0].estimates if rows else {}   # the base's metrics (headline first), 2
    metrics = sorted(base, key=lambda m: not base[m].decl.headline)[:2]
    out = [["arm", *(f"{m} [95% CI]" for m in metrics), "Δ vs base [95% CI]",
            "per scored token", "one-off extra (bytes, s)", "training"]]
    for r in rows:
        label = r.name if set(r.variants) == set(variants) else \
            f"{r.name} [{', '.join(r.variants)}]"
        cells = [fmt_ci(e.estimate.value, e.estimate.lo, e.estimate.hi)
                 if (e := r.estimates.get(m)) else "–" for m in metrics]
        delta = "— (base)" if not r.extra_stages and r.versus is None else "–"
        if r.versus is not None:
            delta = "; ".join(_rel(c, fmt_ci) for c in [r.versus, *r.also])
        cost, train = "–", "–"
        if r.extra_stages:
            cost = (f"{human_bytes(r.extra_bytes)}, {r.extra_seconds:.0f} s"
                    f" ({', '.join(r.extra_stages)})")
            train = "; ".join(
                f"{t['stage']}: {t['steps']} steps"
                + (f" × {t['global_batch']} sequences" if t.get("global_batch") else "")
                + (f", {sig(float(t['tokens']), 3)} tokens" if t.get("tokens") else "")
                + (f", {t['seconds']:.0f} s" if t.get("seconds") else "")
                for t in r.training) or "none"
        elif r.versus is not None:
            train = "none"
        per_token = ", ".join(f"{k.removesuffix('_per_token')} {sig(v, 3)}"
                              for k, v in r.per_token.items()) or "–"
        out.append([label, *cells, delta, per_token, cost, train])
    return out


def _rel(c: Comparison, fmt_ci: Any) -> str:
    d = c.diff
    text = fmt_ci(100 * d.rel, 100 * d.rel_lo, 100 * d.rel_hi, 3)
    return (("" if d.rel < 0 else "+") + text.replace(" [", "% [", 1)
            + f" vs {c.b} ({c.verdict})")
