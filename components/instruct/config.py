"""The `instruct` section: supervised instruction tuning on a blend (InstructRetro, REFERENCE §4).

Defaults are the paper's: 1000 steps of 128 samples (about one pass over a 128K blend), constant
LR 5e-6 (min_lr = lr), AdamW (0.9, 0.98) with weight decay 0.01, clip 1.0, and retrieval gated
off (gate 0, all-zero neighbours), for the Retro arm and the GPT arm alike.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from retro.components.instruct.render import SYSTEM
from retro.components.training.config import ResolvedSchedule, TrainSettings
from retro.platform.registry import register
from retro.platform.spec.node import Node


@register("instruct", "sft", default=True)
class SFT:
    """Instruction tuning: a blend of instruction sources, answer-only loss."""

    class Config(TrainSettings):
        blend: list[Node("blend-source")] = Field(min_length=1)
        """The sources: `{type: <format>, path, weight | samples | epochs, template}`; formats:
        alpaca, dolly, oasst, flan-cot, p3, self-instruct, lima."""
        steps: int = Field(1000, ge=1)
        """Optimizer steps (the paper: 1000)."""
        global_batch: int = Field(128, ge=1)
        """Samples per optimizer step, whatever the worker count."""
        lr: float = Field(5e-6, gt=0)
        """Peak learning rate."""
        min_lr: Optional[float] = Field(None, ge=0)
        """Final learning rate of the cosine decay; None: equal to `lr` (constant, as in the
        paper)."""
        warmup: Union[int, float] = 0
        """Warmup steps (int) or fraction of `steps` (float in [0, 1])."""
        decay: Literal["cosine", "linear", "constant"] = "cosine"
        """Decay from `lr` to `min_lr` after warmup."""
        weight_decay: float = Field(0.01, ge=0)
        """AdamW weight decay."""
        betas: tuple[float, float] = (0.9, 0.98)
        """AdamW (beta1, beta2)."""
        grad_clip: float = Field(1.0, ge=0)
        """Global gradient-norm clip; 0 disables it."""
        seq_length: Optional[int] = Field(None, ge=8)
        """Tokens per sample row (the paper: 4096); None: the model's context length. Longer
        samples keep the end of the prompt and cut the answer's tail."""
        retrieval: bool = False
        """False (InstructRetro): gate 0, the encoder bypassed as with all-zero neighbours, so
        only the decoder learns. True: every chunk of every sample retrieves its neighbours from
        the DB (as pretraining sequences do) and the whole Retro model trains."""
        eval_samples: int = Field(64, ge=0)
        """Records held out of the blend (proportionally per source) for validation loss."""
        system: str = SYSTEM
        """System text opening every sample."""
        eval_batches: int = Field(1, ge=0)
        """Validation batches of `global_batch` held-out samples per evaluation; 0: none."""

        @field_validator("warmup")
        @classmethod
        def _warmup(cls, value: Any) -> Any:
            if isinstance(value, float) and not 0 <= value <= 1:
                raise ValueError("a float warmup is a fraction of the steps: use [0, 1], or an "
                                 "int for a number of steps")
            if isinstance(value, int) and value < 0:
                raise ValueError("warmup steps must be >= 0")
            return value

        @model_validator(mode="after")
        def _lrs(self) -> "SFT.Config":
            if self.min_lr is not None and self.min_lr > self.lr:
                raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}")
            return self

        def schedule(self) -> ResolvedSchedule:
            """The training loop's view of these settings."""
            warmup = self.warmup if isinstance(self.warmup, int) \
                else int(round(self.warmup * self.steps))
            return ResolvedSchedule(
                steps=self.steps, global_batch=self.global_batch, lr=self.lr,
                min_lr=self.lr if self.min_lr is None else self.min_lr,
                warmup_steps=min(warmup, self.steps), decay=self.decay,
                decay_steps=self.steps, weight_decay=self.weight_decay, betas=self.betas,
                grad_clip=self.grad_clip)

    def __init__(self, config: "SFT.Config") -> None:
        self.config = config
