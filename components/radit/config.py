"""RA-DIT's spec pieces: the LSR settings (`recipe.lsr`) and the `ra-it` instruct component.

Defaults are the paper's where it gives them (REFERENCE §6): LSR over the top-10 chunks with
τ = 0.01, LR 1e-5, one epoch, batch 32; RA-IT with the top-3 chunks, LR 1e-5 -> 1e-7 cosine,
warmup 200, 500 steps of 64.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field

from retro.components.evaluators.prompts import SYSTEM as QA_SYSTEM
from retro.components.instruct.config import SFT
from retro.platform.registry import StrictModel, register
from retro.platform.spec.node import Node


class LSRConfig(StrictModel):
    """Retriever fine-tuning by LM-supervised retrieval: only the query encoder trains."""

    data: list[Node("blend-source")] = Field(min_length=1)  # type: ignore[valid-type]
    """D_R: the (x, y) sources, in `instruct.blend` form (`qa-pairs`, alpaca, dolly, ...)."""
    examples: int = Field(1000, ge=1)
    """Training (x, y) pairs drawn from `data` (by its weights / samples / epochs)."""
    eval_examples: int = Field(0, ge=0)
    """Pairs held out of `data` to report the KL and top-1 agreement before and after."""
    k: int = Field(10, ge=2)
    """Chunks retrieved per x with the initial query encoder; p_LSR and p_R live on them."""
    tau: float = Field(0.01, gt=0)
    """LM temperature τ of p_LSR = softmax(score / τ) (the paper: 0.01)."""
    lm_score: Literal["logprob", "mean_logprob", "prob"] = "logprob"
    """score(c) of p_LSR: log p_LM(y | c∘x) summed over y's tokens, its per-token mean, or the
    probability itself (the paper's formula writes p_LM; with τ = 0.01 a probability gives a
    near-uniform target for any y longer than a few tokens)."""
    retriever_temperature: float = Field(0.1, gt=0)
    """p_R = softmax(s(q, d) / this), s = the index metric (inner product, or -L2²). Cosine
    scores of a normalised encoder need a small value to express a peaked distribution."""
    kl: Literal["lsr_r", "r_lsr"] = "lsr_r"
    """`lsr_r`: KL(p_LSR ‖ p_R), the soft-label cross-entropy the LSR implementations
    minimise; `r_lsr`: KL(p_R ‖ p_LSR), the order the RA-DIT / REPLUG papers write."""
    lr: float = Field(1e-5, gt=0)
    """AdamW learning rate of the query encoder (constant after warmup)."""
    warmup: int = Field(0, ge=0)
    """Linear warmup steps."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training pairs (the paper: one)."""
    batch_size: int = Field(32, ge=1)
    """Pairs per optimizer step."""
    grad_clip: float = Field(1.0, ge=0)
    """Gradient-norm clip; 0 disables it."""
    lm_batch_size: int = Field(8, ge=1)
    """(chunk, x, y) rows per LM forward while precomputing the LM scores."""
    max_tokens: int = Field(512, ge=32)
    """LM tokens per scored row (background + x + y); the chunk is cut to half of it."""
    system: str = f"System: {QA_SYSTEM}"
    """System text opening every scored row (as RA-IT's rows and the QA prompt)."""


@register("instruct", "ra-it")
class RAIT:
    """RA-IT: instruction tuning with one retrieved chunk per row, answer-only loss.

    Every example is repeated with each of its top-k retrieved chunks as "Background: ..."
    before the instruction."""

    class Config(SFT.Config):
        retrieve_k: int = Field(3, ge=1)
        """Chunks retrieved per example; each gives one training row (the paper: 3)."""
        steps: int = Field(500, ge=1)
        """Optimizer steps (the paper: 500)."""
        global_batch: int = Field(64, ge=1)
        """Rows (example x chunk) per optimizer step (the paper: 64 for 7B)."""
        lr: float = Field(1e-5, gt=0)
        """Peak learning rate (the paper: 1e-5)."""
        min_lr: Union[float, None] = Field(1e-7, ge=0)
        """Final learning rate of the cosine decay (the paper: 1e-7)."""
        warmup: Union[int, float] = 200
        """Warmup steps (int) or fraction of `steps` (the paper: 200 steps)."""
        system: str = f"System: {QA_SYSTEM}"
        """System text opening every row; default: the QA evaluator's, so the tuned LM sees
        the prompt it is tested with."""
        retrieval: Literal[False] = False
        """Always false: RA-IT puts the chunks in the prompt, not in a Retro encoder."""
        max_background_tokens: int = Field(256, ge=8)
        """A chunk longer than this (in LM tokens) is cut, so the instruction always fits."""

    def __init__(self, config: "RAIT.Config") -> None:
        self.config = config
