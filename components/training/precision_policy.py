"""bf16 compute with fp32 master weights, the way the training loop runs it (issue 15 point 2).

One contract whatever the sharding: parameters, gradients (accumulated over micro-batches),
AdamW's state and the loss are fp32; forward and backward run with bf16 copies of the
parameters. Buffers are never cast (rotary `inv_freq` stays fp32: rounding it to bf16 would
shift the angles at long positions).

- `fp32`: nothing changes (the loop steps the fp32 model as it always did).
- `bf16` under FSDP2: `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` on every
  `fully_shard` call (`fsdp_kwargs`): the sharded parameters stay fp32, each unit is
  all-gathered in bf16, gradients are reduce-scattered in fp32 into the fp32 shards.
- `bf16` without FSDP (one process, or replicas on several workers): `Bf16Compute`, the same
  by hand. A bf16 copy of the parameters runs forward and backward; after each micro-batch its
  bf16 gradients are added into the masters' fp32 `.grad`; with several workers those are
  all-reduced in fp32 once per step (DDP is not used: its reducer would reduce the bf16
  gradients of the last micro-batch only); after the optimizer step the copy is refreshed.

Why not autocast (what the loop ran before): it re-casts every weight at every use
(`aten::copy_`, ~11% of a CPU step) and runs the residual stream in fp32; bf16 parameters
cast once per step, which is what FSDP2's policy does too (docs/benchmarks.md, "Precision").
torch is imported inside functions only.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PrecisionPolicy:
    """How one worker computes.

    Attributes:
        precision: the resolved precision (`bf16` / `fp32`).
        sharded: FSDP2 across more than one worker.
    """

    precision: str
    sharded: bool

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def by_hand(self) -> bool:
        """bf16 without FSDP: `Bf16Compute` keeps the copy and syncs the gradients, so the
        loop must not wrap the model in DDP."""
        return self.bf16 and not self.sharded

    def fsdp_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for every `fully_shard` call."""
        if not self.bf16:
            return {}
        import torch
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                  reduce_dtype=torch.float32)}

    def compute(self, wrapped: Any, world: int = 1) -> "Compute":
        """What runs forward and backward for `wrapped` (built after any checkpoint load)."""
        if self.by_hand:
            return Bf16Compute(wrapped, world)
        return Compute(wrapped)


class Compute:
    """The model itself computes (fp32, or FSDP2's policy): every hook is a no-op."""

    def __init__(self, model: Any):
        self.model = model

    def context(self) -> Any:
        return contextlib.nullcontext()

    def after_backward(self) -> None:
        """Called after each micro-batch's backward."""

    def before_step(self) -> None:
        """Called once per step before clipping: gradients are final afterwards."""

    def after_step(self) -> None:
        """Called after the optimizer step."""


class Bf16Compute(Compute):
    """A bf16 copy of `master`'s parameters for forward/backward; fp32 gradients and updates
    on `master` (the module the optimizer, checkpoints and export see).

    Args:
        master: the bare fp32 model (not DDP-wrapped).
        world: workers; > 1 all-reduces the fp32 gradients in `before_step`.
    """

    def __init__(self, master: Any, world: int = 1):
        import torch

        self.master, self.world = master, world
        # deepcopy with the parameters pre-seeded as bf16 copies: no second fp32 model is
        # ever allocated, and tied parameters stay tied (one memo entry per tensor)
        memo = {id(p): torch.nn.Parameter(p.detach().to(torch.bfloat16),
                                          requires_grad=p.requires_grad)
                for p in master.parameters() if p.is_floating_point()}
        super().__init__(copy.deepcopy(master, memo))
        names = [n for n, _ in master.named_parameters()]
        if names != [n for n, _ in self.model.named_parameters()]:
            raise RuntimeError("bf16 compute copy: parameter order differs from the master")
        self.pairs = [(m, c) for m, c in zip(master.parameters(), self.model.parameters())
                      if m.requires_grad]
        self.model.train(master.training)

    def after_backward(self) -> None:
        """Move this micro-batch's bf16 gradients into the fp32 masters (fp32 accumulation)."""
        for m, c in self.pairs:
            if c.grad is None:
                continue
            if m.grad is None:
                m.grad = c.grad.float()
            else:
                m.grad.add_(c.grad)
            c.grad = None

    def before_step(self) -> None:
        """Several workers: sum the fp32 gradients in one all-reduce and average them (as DDP
        does); a parameter no rank gave a gradient keeps `grad=None` (DDP's unused ones)."""
        if self.world == 1:
            return
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        masters = [m for m, _ in self.pairs]
        device = masters[0].device if masters else torch.device("cpu")
        flat = torch.cat([(m.grad if m.grad is not None else torch.zeros_like(m)).flatten()
                          for m in masters]
                         + [torch.tensor([float(m.grad is not None) for m in masters],
                                         device=device)])
        dist.all_reduce(flat)
        flat[:-len(masters)].div_(self.world)
        offset = 0
        used = flat[-len(masters):]
        for i, m in enumerate(masters):
            n = m.numel()
            m.grad = flat[offset:offset + n].view_as(m) if used[i] > 0 else None
            offset += n

    def after_step(self) -> None:
        """Refresh the bf16 copy from the updated masters (round to nearest)."""
        import torch

        with torch.no_grad():
            for m, c in self.pairs:
                c.copy_(m)
