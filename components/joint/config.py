"""The joint recipe's training node (`recipe.joint`) and its comparison arms.

Defaults follow Atlas where it states them (REFERENCE_FAMILIES §D: PDist on the length-normalised
log-likelihood, reader lr 4e-5, retriever lr 1e-5; its temperatures 0.01 are raised to 0.1 for
MiniLM's cosine scores, as ra-dit-tiny does) and RA-DIT for the rows (the QA system text, "Background:" chunks).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from retro.components.evaluators.prompts import SYSTEM as QA_SYSTEM
from retro.components.joint.refresh_config import RefreshConfig
from retro.platform.registry import StrictModel
from retro.platform.spec.node import Node

Arm = Literal["fixed", "query-side", "every", "staleness", "never", "as-written"]
ARMS: dict[str, str] = {
    "fixed": "no retriever training: the LM trains on the frozen retriever's chunks",
    "query-side": "query tower trains, document tower frozen (Atlas query-side): no refresh",
    "every": "both towers train, index refreshed every `refresh.every` steps (Atlas)",
    "staleness": "both towers train, refresh when probe recall@k < `refresh.threshold`",
    "never": "both towers train, the index is never refreshed (the staleness ablation)",
    "as-written": "the `recipe.joint` node exactly as written",
}
"""Comparison arms: each is one `joint-train` call of the plan (the recipe's `arms`)."""


class JointConfig(StrictModel):
    """Joint training of a reader LM and a MiniLM dual encoder over the live index."""

    data: list[Node("blend-source")] = Field(min_length=1)  # type: ignore[valid-type]
    """The (x, y) training sources in `instruct.blend` form (`qa-pairs` for open-domain QA);
    questions of the spec's `qa` evaluators are removed."""
    examples: int = Field(64, ge=1)
    """Training examples drawn from `data`."""
    steps: int = Field(16, ge=1)
    """Optimizer steps; each takes `batch_size` examples (cycling through `examples`)."""
    batch_size: int = Field(4, ge=1)
    """Examples per step (each with its k chunks: k LM rows)."""
    k: int = Field(4, ge=1)
    """Chunks retrieved per example from the live index with the current query encoder."""
    retriever_loss: Literal["pdist", "emdr2", "none"] = "pdist"
    """Atlas's perplexity distillation (= RA-DIT's LSR against the current LM), EMDR², or none
    (the retriever does not train)."""
    lm_score: Literal["mean_logprob", "logprob"] = "mean_logprob"
    """PDist's score of a chunk: y's mean token log-prob (Atlas `ppmean`) or the sum (RA-DIT)."""
    tau: float = Field(0.1, gt=0)
    """PDist target temperature (Atlas `temperature_gold`, RA-DIT τ)."""
    retriever_temperature: float = Field(0.1, gt=0)
    """p_R = softmax(s(q, d) / this) (Atlas `temperature_score`); cosine scores need a small
    value."""
    kl: Literal["lsr_r", "r_lsr"] = "lsr_r"
    """PDist's KL order: KL(target ‖ p_R) (Atlas, LSR code) or KL(p_R ‖ target)."""
    emdr_marginal: Literal["token", "sequence"] = "token"
    """EMDR²: mix per answer token (Atlas's code) or whole answers (the paper's equation)."""
    reader: Literal["replug", "rows"] = "replug"
    """The LM's loss on its k rows: REPLUG's ensemble -log Σ p_R p_LM(y | c∘x) (p_R detached),
    or every row's own NLL averaged (RA-IT). Evaluate with the qa evaluator's `replug: true`."""
    train_lm: bool = True
    """False: the LM is frozen (a retriever-only run against a fixed reader, REPLUG LSR)."""
    lr: float = Field(4e-5, gt=0)
    """AdamW learning rate of the LM (Atlas NQ: 4e-5)."""
    retriever_lr: float = Field(1e-5, gt=0)
    """AdamW learning rate of the query and document towers (Atlas: 1e-5)."""
    warmup: int = Field(0, ge=0)
    """Linear warmup steps of both learning rates."""
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    """Gradient-norm clip per model; 0 disables it."""
    max_tokens: int = Field(320, ge=32)
    """LM tokens per row (system, background, x, y); longer rows lose their prompt's start."""
    max_background_tokens: int = Field(128, ge=8)
    """A chunk longer than this (LM tokens) is cut."""
    system: str = f"System: {QA_SYSTEM}"
    """System text of every row (the QA evaluator's, so the tuned LM sees the test prompt)."""
    final_refresh: bool = True
    """Re-embed the corpus with the final document tower at the end (what evaluation searches);
    a frozen document tower needs none and keeps its initial index."""
    refresh: RefreshConfig = RefreshConfig()
    """When the index is re-embedded (policies every / staleness / query_side_only / never) and
    how staleness is probed. An arm overrides `policy`."""
    refresh_threads: int = Field(1, ge=1)
    """Torch threads of the refresh actor."""


def arm_config(cfg: JointConfig, arm: str, every: int | None = None) -> JointConfig:
    """`cfg` with the arm's overrides (the refresh policy, the retriever loss); `every`: the
    interval of the `every` arm (default: the node's, else a quarter of the steps)."""
    refresh = cfg.refresh.model_dump()
    if arm == "as-written":
        return cfg
    if arm == "fixed":
        return cfg.model_copy(update={"retriever_loss": "none", "final_refresh": False,
                                      "refresh": RefreshConfig(**{**refresh, "every": None,
                                                                  "policy": "never"})})
    if arm == "query-side":
        policy = "query_side_only"
    elif arm in ("every", "staleness", "never"):
        policy = arm
    else:
        raise ValueError(f"unknown arm {arm!r}; one of {sorted(ARMS)}")
    if policy == "every":
        refresh["every"] = every or refresh.get("every") or max(1, cfg.steps // 4)
    if policy != "every":
        refresh["every"] = None
    return cfg.model_copy(update={"refresh": RefreshConfig(**{**refresh, "policy": policy})})
