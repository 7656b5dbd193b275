"""When the joint recipe re-embeds the corpus: the `refresh:` node and the decision rule.

Policies (issue 17): `every` (Atlas' fixed interval), `staleness` (refresh when the probe recall@k
of the stale index against exact search over fresh document embeddings drops below a threshold),
`query_side_only` (the document tower is frozen, the index never goes stale) and `never`
(the document tower trains but the index stays as built: the staleness ablation).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from retro.platform.registry import StrictModel

Policy = Literal["every", "staleness", "query_side_only", "never"]


class RefreshConfig(StrictModel):
    """How and when the document index is refreshed during joint training."""

    policy: Policy = "staleness"
    """`every` (refresh every `every` steps, Atlas), `staleness` (refresh when the probe recall@k
    drops below `threshold`), `query_side_only` (document tower frozen: no refresh needed) or
    `never` (document tower trains, index never refreshed)."""
    every: Optional[int] = Field(None, ge=1)
    """Steps between refreshes; required by (and only read with) `policy: every`."""
    threshold: float = Field(0.9, gt=0, le=1)
    """`policy: staleness`: refresh when the probe recall@k falls below this."""
    check_every: int = Field(1, ge=1)
    """Steps between staleness measurements (each re-embeds the probe documents)."""
    probe_queries: int = Field(64, ge=1)
    """Size of the fixed probe set of queries (seeded sample of the training questions)."""
    probe_docs: int = Field(1024, ge=1)
    """Size of the fixed probe document subset: the probes' gold passages plus a seeded random
    sample, re-embedded at each check (capped at the corpus size)."""
    probe_k: int = Field(10, ge=1)
    """k of the probe recall@k."""
    shards: int = Field(4, ge=1)
    """Re-embedding shards per refresh; each is written on its own, so a crash resumes at the
    first unfinished shard."""

    @model_validator(mode="after")
    def _check(self) -> "RefreshConfig":
        if self.policy == "every" and self.every is None:
            raise ValueError("policy `every` needs `every: N` (steps between refreshes)")
        if self.policy != "every" and self.every is not None:
            raise ValueError(f"`every` is only read with policy `every`, not {self.policy!r}: "
                             "remove it or set policy: every")
        if self.probe_k > self.probe_docs:
            raise ValueError(f"probe_k ({self.probe_k}) must be <= probe_docs "
                             f"({self.probe_docs})")
        return self

    @property
    def trains_doc_encoder(self) -> bool:
        """False for `query_side_only`: the document tower stays frozen."""
        return self.policy != "query_side_only"

    @property
    def measures_staleness(self) -> bool:
        """Whether probe recall is measured at all (telemetry for every policy that trains the
        document tower; it drives the decision only for `staleness`)."""
        return self.trains_doc_encoder


def should_refresh(cfg: RefreshConfig, step: int, last_refresh_step: int,
                   staleness_recall: Optional[float], in_flight: bool) -> bool:
    """Whether to start a refresh after `step` (steps counted as the trainer counts them).

    Args:
        cfg: the refresh node.
        step: the step just finished.
        last_refresh_step: the step whose encoder snapshot the current (or in-flight) index was
            built from (0 for the initial index).
        staleness_recall: the latest probe recall@k, None when not measured this step.
        in_flight: a refresh is already running (never start a second one).
    """
    if in_flight or cfg.policy in ("never", "query_side_only"):
        return False
    if cfg.policy == "every":
        return step - last_refresh_step >= cfg.every
    return staleness_recall is not None and staleness_recall < cfg.threshold
