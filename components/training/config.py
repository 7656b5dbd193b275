"""Trainer configs: the `pretrain` section (`type: lm`) and the pieces `instruct` shares with it.

A `Schedule` field left unset (None) takes the value the model's size preset carries from the
papers (REFERENCE §3 tables), and failing that the fallback in `FALLBACK`; `resolve_schedule()`
does that once, in the stage, and the resolved numbers go into the artifact manifest.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from retro.components.precision import Precision
from retro.platform.registry import StrictModel, register

# Used when neither the spec nor the model preset gives a value: small-model, CPU-friendly numbers.
FALLBACK: dict[str, Any] = {
    "steps": 100, "global_batch": 8, "lr": 3e-4, "min_lr": 3e-5, "warmup": 0.01,
    "decay": "cosine", "weight_decay": 0.1, "betas": (0.9, 0.95), "grad_clip": 1.0,
}


class Schedule(StrictModel):
    """Length, batch, optimizer and LR schedule of one training phase (AdamW)."""

    steps: Optional[int] = Field(None, ge=1)
    """Optimizer steps. Give one of `steps`, `samples`, `tokens` (or none: the preset's
    length, kept in samples). A length set here ends the decay at the last step unless
    `decay_steps` / `decay_samples` is set too."""
    samples: Optional[int] = Field(None, ge=1)
    """Training sequences (Megatron's --train-samples); steps = samples // global_batch."""
    tokens: Optional[int] = Field(None, ge=1)
    """Training tokens; steps = ceil(tokens / (global_batch * seq_length))."""
    global_batch: Optional[int] = Field(None, ge=1)
    """Sequences per optimizer step, whatever the worker count (gradient accumulation)."""
    lr: Optional[float] = Field(None, gt=0)
    """Peak learning rate, reached at the end of warmup."""
    min_lr: Optional[float] = Field(None, ge=0)
    """Learning rate at the end of the decay (and after it)."""
    warmup: Optional[Union[int, float]] = None
    """Warmup: an int is a number of steps, a float in [0, 1] a fraction of `steps`."""
    warmup_samples: Optional[int] = Field(None, ge=0)
    """Warmup in sequences (Megatron's --lr-warmup-samples): round(samples / global_batch)
    steps, so it keeps its length in data when the batch changes."""
    decay: Optional[Literal["cosine", "linear", "constant"]] = None
    """Decay from `lr` to `min_lr` after warmup (default cosine)."""
    decay_steps: Optional[int] = Field(None, ge=1)
    """Step at which the decay reaches `min_lr`; None: `decay_samples`, else the last step
    (or the preset's decay when the length is the preset's too)."""
    decay_samples: Optional[int] = Field(None, ge=1)
    """The decay's end in sequences (Megatron's --lr-decay-samples):
    ceil(samples / global_batch) steps."""
    weight_decay: Optional[float] = Field(None, ge=0)
    """AdamW weight decay (not applied to biases, norms and other 1-D tensors)."""
    betas: Optional[tuple[float, float]] = None
    """AdamW (beta1, beta2)."""
    grad_clip: Optional[float] = Field(None, ge=0)
    """Clip the global gradient norm to this value; 0 disables clipping."""

    @model_validator(mode="after")
    def _check(self) -> "Schedule":
        lengths = [k for k in ("steps", "samples", "tokens") if getattr(self, k) is not None]
        if len(lengths) > 1:
            raise ValueError(f"give one of `steps`, `samples`, `tokens`, not {lengths}")
        if self.warmup is not None and self.warmup_samples is not None:
            raise ValueError("give `warmup` (steps or a fraction) or `warmup_samples`, not both")
        if self.decay_steps is not None and self.decay_samples is not None:
            raise ValueError("give `decay_steps` or `decay_samples`, not both")
        if isinstance(self.warmup, float) and not 0 <= self.warmup <= 1:
            raise ValueError(f"warmup {self.warmup} as a float is a fraction of the steps: "
                             "use a value in [0, 1], or an int for a number of steps")
        if isinstance(self.warmup, int) and self.warmup < 0:
            raise ValueError("warmup steps must be >= 0")
        if self.lr is not None and self.min_lr is not None and self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}")
        if self.betas is not None and not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas {self.betas} must lie in [0, 1)")
        return self


@dataclass(frozen=True)
class ResolvedSchedule:
    """A `Schedule` with every value decided; what the training loop receives."""

    steps: int
    global_batch: int
    lr: float
    min_lr: float
    warmup_steps: int
    decay: str
    decay_steps: int
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float
    seq_length: Optional[int] = None
    """Tokens per sequence, when known (for `tokens`)."""

    @property
    def samples(self) -> int:
        return self.steps * self.global_batch

    @property
    def tokens(self) -> Optional[int]:
        return None if self.seq_length is None else self.samples * self.seq_length

    def values(self) -> dict[str, Any]:
        """Every effective value, derived ones included (for manifests and resolved.yaml)."""

        return {**asdict(self), "samples": self.samples, "tokens": self.tokens}

    def summary(self) -> str:
        """One line for `retro plan` and logs: every value that shapes the LR curve."""
        return (f"{self.steps:,} steps x {self.global_batch} seqs, lr {self.lr:.3g} -> "
                f"{self.min_lr:.3g} {self.decay}, warmup {self.warmup_steps:,} steps, decay "
                f"ends at step {self.decay_steps:,}")

    def lr_at(self, step: int) -> float:
        """Learning rate used by optimizer step `step` (0-based): linear warmup, then decay."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(self.decay_steps - self.warmup_steps, 1)
        progress = min(max(step - self.warmup_steps, 0) / span, 1.0)
        if self.decay == "constant":
            return self.lr
        if self.decay == "linear":
            coeff = 1.0 - progress
        else:
            coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + coeff * (self.lr - self.min_lr)


LENGTH_FIELDS = ("steps", "samples", "tokens")


def resolve_schedule(schedule: Schedule, seq_length: int,
                     *defaults: dict[str, Any]) -> ResolvedSchedule:
    """Every effective value of a training phase's schedule, from the spec, then `defaults`
    (in order, e.g. the model preset's paper values), then `FALLBACK`.

    Warmup, decay and a default's length are amounts of data (samples, as Megatron counts
    them), converted to steps with the resolved global batch, so changing the batch keeps
    them. A length the spec sets (`steps`/`samples`/`tokens`) ends the decay at the last
    step, unless the spec also sets the decay; a default's decay only goes with a default's
    length.

    Args:
        schedule: the spec's schedule block.
        seq_length: tokens per sequence (turns `tokens` into steps).
        defaults: dicts of Schedule field names -> values; a default may also carry `steps`
            with the `global_batch` it was written for (converted to samples).

    Returns:
        The fully decided schedule (pure: same inputs, same result).
    """
    given = {k: v for k, v in schedule.model_dump().items() if v is not None}
    sources = [given, *({k: v for k, v in d.items() if v is not None} for d in defaults),
               dict(FALLBACK)]

    def first(*keys: str, upto: int = len(sources)) -> tuple[Optional[str], Any]:
        for src in sources[:upto]:
            for k in keys:
                if k in src:
                    return k, src[k]
        return None, None

    global_batch = int(first("global_batch")[1])
    at = next(i for i, src in enumerate(sources) if any(k in src for k in LENGTH_FIELDS))
    length = sources[at]
    if "steps" in length and (at == 0 or at == len(sources) - 1):   # the spec's, FALLBACK's
        steps = int(length["steps"])
    elif "steps" in length or "samples" in length:   # a default's steps: samples at its batch
        samples = int(length.get("samples") or length["steps"] * length.get("global_batch",
                                                                            global_batch))
        steps = samples // global_batch
    else:
        steps = math.ceil(float(length["tokens"]) / (global_batch * seq_length))
    steps = max(steps, 1)
    key, warmup = first("warmup", "warmup_samples")
    if key == "warmup_samples":
        warmup_steps = int(round(int(warmup) / global_batch))
    else:
        warmup_steps = int(warmup) if isinstance(warmup, int) else int(round(warmup * steps))
    key, decay = first("decay_steps", "decay_samples", upto=at + 1)
    decay_steps = (steps if key is None else int(decay) if key == "decay_steps"
                   else math.ceil(int(decay) / global_batch))
    lr = float(first("lr")[1])
    return ResolvedSchedule(
        steps=steps, global_batch=global_batch, lr=lr, min_lr=min(float(first("min_lr")[1]), lr),
        warmup_steps=min(warmup_steps, steps), decay=first("decay")[1],
        decay_steps=max(decay_steps, 1), weight_decay=float(first("weight_decay")[1]),
        betas=tuple(first("betas")[1]), grad_clip=float(first("grad_clip")[1]),
        seq_length=seq_length)


resolve = resolve_schedule
"""The former name (callers outside the training stages use it)."""


class TrainSettings(StrictModel):
    """Spec-facing settings of a training stage that its artifact depends on (its key):
    micro-batching, evaluation, precision. How it executes (checkpoint cadence, failures,
    sharding) is `resources.stages.<name>`, never part of a key."""

    micro_batch: int = Field(1, ge=1)
    """Sequences per forward pass on one worker. Gradient accumulation makes up the rest of
    the global batch, so this changes memory use, not results."""
    eval_interval: int = Field(100, ge=1)
    """Run validation every this many steps (and after the last step)."""
    eval_batches: int = Field(4, ge=0)
    """Validation batches of `global_batch` sequences per evaluation (Megatron eval-iters);
    capped by the validation set; 0 disables validation."""
    precision: Precision = "auto"
    """`auto`: bf16 where the worker's hardware computes bf16 fast (AMX / AVX512-BF16 CPUs,
    CUDA compute capability >= 8.0), else fp32; `bf16` / `fp32` force it. bf16 runs forward
    and backward on bf16 parameter copies (FSDP2: its MixedPrecisionPolicy); master weights,
    gradients, optimizer state and the loss stay fp32 (training/precision_policy.py). An
    `auto` artifact made on a bf16 machine is bf16 for everyone sharing the store: pin it when
    that matters (docs/precision.md)."""


class RunSettings(TrainSettings):
    """Everything the loop needs to run: the keyed settings plus the stage's execution
    settings (`run_settings` fills these from `resources.stages.<name>`)."""

    checkpoint_interval: int = Field(100, ge=1)
    """Save a resumable checkpoint every this many steps (and after the last step)."""
    max_failures: int = Field(3, ge=0)
    """Worker-group restarts from the last checkpoint before the stage fails."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state across workers (FSDP2) instead of
    replicating them (DDP); for models that do not fit one device."""
    find_unused_parameters: Optional[bool] = None
    """DDP's `find_unused_parameters`; None: detect (see `loop._unused_parameters`)."""
    export_shard_bytes: int = Field(2 * 2**30, ge=1)
    """Safetensors shard size of the streamed export of an FSDP-trained model
    (`sharded_export.py`)."""
    activation_checkpointing: Union[bool, int] = False
    """Recompute decoder blocks in backward (true: every block, N: every N-th, false: off);
    memory and time change, results do not (`activation_checkpointing.py`)."""


def run_settings(settings: TrainSettings, resources: Any) -> RunSettings:
    """The loop's settings: a stage's keyed `settings` + its `resources` (a ResourceRequest)."""
    return RunSettings(**{k: getattr(settings, k) for k in TrainSettings.model_fields},
                       checkpoint_interval=resources.checkpoint_interval,
                       max_failures=resources.max_failures, fsdp=resources.fsdp,
                       find_unused_parameters=getattr(resources, "find_unused_parameters",
                                                      None),
                       activation_checkpointing=getattr(resources, "activation_checkpointing",
                                                        False))


@register("trainer", "lm", default=True)
class LMTrainer:
    """Causal-LM training: GPT pretraining (`gpt`) and continued pretraining (`fit`)."""

    class Config(TrainSettings):
        seq_length: int = Field(2048, ge=8)
        """Tokens per training sequence (RETRO/Shall-we 2048, Retro 48B 4096); a multiple of
        the retriever's chunk length."""
        gpt: Schedule = Schedule()
        """Stage `gpt-pretrain`: the decoder trained from scratch on the corpus."""
        fit: Schedule = Schedule()
        """Stages `retro-fit` and `gpt-fit` (continued pretraining; the same schedule for both,
        so GPT-fit is the control). Unset fields come from the model preset (REFERENCE §3)."""

        @field_validator("gpt", "fit", mode="before")
        @classmethod
        def _none_is_default(cls, value: Any) -> Any:
            return {} if value is None else value

    def __init__(self, config: "LMTrainer.Config") -> None:
        self.config = config
