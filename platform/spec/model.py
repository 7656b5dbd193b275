"""The spec's shape: the platform's public contract.

The platform owns the sections and the execution settings (`resources`, `store`, `tracking`,
`sweep`); what fills a science section is a registered component chosen by `type:`. Changing a
`resources` field never changes an artifact key; changing a science field a stage reads does.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from retro.platform.registry import StrictModel
from retro.platform.spec.node import Node


class ResourceRequest(StrictModel):
    """How one stage executes: what it asks of the cluster, how it survives failures, how it
    checkpoints and shards. Never part of an artifact key (Ray's RunConfig / ScalingConfig
    split): none of these changes the numbers a stage produces."""

    num_workers: int = Field(1, ge=1)
    """Parallel workers (shards of a data stage, or Ray Train workers of a training stage)."""
    cpus_per_worker: float = Field(1.0, ge=0)
    """CPUs reserved per worker."""
    gpus_per_worker: float = Field(0.0, ge=0)
    """GPUs reserved per worker (fractions allowed)."""
    memory_gb: Optional[float] = Field(None, gt=0)
    """Memory reserved per worker, in GiB; None reserves none."""
    max_failures: int = Field(3, ge=0)
    """Training stages: worker-group restarts from the last checkpoint before the stage
    fails."""
    checkpoint_interval: int = Field(100, ge=1)
    """Training stages: save a resumable checkpoint every this many steps (and after the
    last). Resume is exact, so the cadence never changes results."""
    fsdp: bool = False
    """Training stages: shard parameters, gradients and optimizer state across workers
    (FSDP2) instead of replicating them (DDP); for models that do not fit one device."""
    find_unused_parameters: Optional[bool] = None
    """Training stages under DDP: trainable parameters may get no gradient (gate 0, no
    neighbours). None detects it from the first micro-batch's autograd graph; true / false
    force DDP's `find_unused_parameters`."""
    activation_checkpointing: Union[bool, int] = False
    """Training stages: recompute each decoder block's activations in backward instead of
    keeping them (true: every block; N: every N-th block). `retro plan` counts it in the
    per-device memory."""
    device: Optional[Literal["a100-40g", "a100-80g", "h100-80g", "h200-141g", "l40s-48g",
                             "a10g-24g"]] = None
    """Accelerator each worker gets, for `retro plan`'s memory check (its total memory as the
    driver reports it, less a reserve of max(5%, 1.5 GiB) for the CUDA context, workspaces and
    allocator fragmentation)."""
    gpu_memory_gb: Optional[float] = Field(None, gt=0)
    """Device memory per worker in GiB (the total, as the driver reports it) for `retro plan`'s
    check, less the same reserve as `device`; wins over `device`."""

    @field_validator("activation_checkpointing")
    @classmethod
    def _every_n(cls, value: Any) -> Any:
        if not isinstance(value, bool) and value < 1:
            raise ValueError("activation_checkpointing: true, false, or N >= 1 (every N-th "
                             "block)")
        return value


class Resources(StrictModel):
    """Execution settings. Changing these reuses every cached artifact."""

    ray_address: Optional[str] = None
    """Ray cluster to join (e.g. `auto`, `ray://head:10001`). None: `RAY_ADDRESS` if set,
    otherwise an embedded local Ray started for the run."""
    num_cpus: Optional[int] = Field(None, ge=1)
    """CPUs of the embedded local Ray; None uses every core."""
    max_concurrent_stages: Optional[int] = Field(None, ge=1)
    """Upper bound on stages running at once; None lets Ray's resource accounting decide."""
    default: ResourceRequest = ResourceRequest()
    """Resources of every stage not listed in `stages`."""
    stages: dict[str, ResourceRequest] = {}
    """Per-stage resources, keyed by the stage names `retro plan` shows."""


class StoreConfig(StrictModel):
    """Where artifacts and run records live (relative paths are relative to the working dir)."""

    path: str = ".retro/store"
    """Artifact store root; point several users at one shared filesystem path to share work."""
    runs: str = "runs"
    """Directory that receives one folder per run (resolved spec, plan, events, logs)."""


class SweepVariant(StrictModel):
    """One named point of a sweep."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Variant name, used in run folders, reports and W&B run names."""
    set: dict[str, Any] = {}
    """Dotted spec paths and the values this variant gives them."""


class Sweep(StrictModel):
    """Variants of one experiment: a grid over dotted paths, or an explicit list."""

    grid: dict[str, list[Any]] = {}
    """Dotted path -> values; the variants are the cartesian product."""
    variants: list[SweepVariant] = []
    """Explicit named variants."""

    @model_validator(mode="after")
    def _one_form(self) -> "Sweep":
        if bool(self.grid) == bool(self.variants):
            raise ValueError("give exactly one of `grid` (path -> list of values) or "
                             "`variants` (list of {name, set})")
        for path, values in self.grid.items():
            if not values:
                raise ValueError(f"grid path {path!r} has no values")
        return self


class Spec(StrictModel):
    """A whole experiment. Built-in specs live in `specs/`."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Experiment name; run folders are `<runs>/<name>-<time>`."""
    description: str = ""
    """Free text shown by `retro plan` and in reports."""
    seed: int = 0
    """Seed of every random choice (splits, samples, init, data order)."""
    recipe: Node("recipe") = Field(default_factory=dict, validate_default=True)
    """Which stages the experiment needs and how they connect."""
    corpus: Optional[Node("corpus")] = None
    """The retrieval database and pretraining text."""
    tokenizer: Optional[Node("tokenizer")] = None
    """Decoder tokenizer."""
    retriever: Optional[Node("retriever")] = None
    """Chunking, embedder, index and neighbour settings (or a sparse retriever)."""
    model: Optional[Node("model")] = None
    """Size preset or dims, init checkpoint, Retro layout, freeze policy."""
    pretrain: Optional[Node("trainer")] = None
    """GPT pretraining and continued pretraining (retro-fit / gpt-fit) settings."""
    instruct: Optional[Node("instruct")] = None
    """Instruction tuning: the blend and SFT hyper-parameters."""
    eval: list[Node("evaluator")] = []
    """Evaluators run on every trained model."""
    tracking: list[Node("tracker")] = Field(default_factory=lambda: [{}], validate_default=True)
    """Trackers; a local JSONL mirror is always written in addition."""
    resources: Resources = Resources()
    """Execution settings (never part of an artifact key)."""
    store: StoreConfig = StoreConfig()
    """Artifact store and run folders."""
    sweep: Optional[Sweep] = None
    """Variants of this experiment sharing every stage they can."""
    lock: Optional[dict[str, Any]] = None
    """Written by `retro run` into resolved.yaml (versions, git commit, data hashes); read-only."""

    @field_validator("tracking", mode="before")
    @classmethod
    def _tracking_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, (dict, str)) else value


SECTIONS = list(Spec.model_fields)
