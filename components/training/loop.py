"""The training loop, identical in-process (tests, one worker) and inside Ray Train workers.

One optimizer step consumes `global_batch` rows chosen by `GlobalBatchSampler(step)`; rank r
takes rows r, r+W, r+2W, ... of them and runs them in micro-batches with gradient sync only on
the last. Each micro-batch's summed token loss is divided by the global batch's loss-token count
(times W, because DDP/FSDP average gradients over ranks), so the gradient is the same mean over
the global batch whatever the worker count or micro-batch size.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from retro.components.training.dcp import load_checkpoint, resume_point, save_checkpoint
from retro.components.training.sharded import materialise, meta_model, return_large_frees_to_os
from retro.components.training.sharded_export import export_sharded
from retro.components.training.activation_checkpointing import apply_activation_checkpointing
from retro.components.training.config import ResolvedSchedule, RunSettings
from retro.components.training.data import GlobalBatchSampler, TokenRows
from retro.components.training.precision_policy import PrecisionPolicy
from retro.platform.errors import UserError
from retro.platform.timing import Timings
import numpy as np
import shutil
from retro.components.precision import (autocast, hardware_text, precision_warning,
                                        resolve_precision)


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs, picklable: callables are module-level functions or partials.

    Attributes:
        name: stage name, for logs.
        model: builds the model to train (initialised, freeze policy applied) on CPU.
        train_data: builds the training split.
        val_data: builds the validation split, or None.
        schedule: steps, batch and optimizer settings.
        run: micro-batching, eval, checkpoint, failure and sharding settings.
        seed: the experiment seed (model init, data order, dropout).
        out_dir: rank 0 writes `final/` (the trained model) and `train_metrics.jsonl` here.
        export: writes the trained model to a directory; default `model.save_pretrained`.
    """

    name: str
    model: Callable[[], Any]
    train_data: Callable[[], TokenRows]
    val_data: Optional[Callable[[], TokenRows]]
    schedule: ResolvedSchedule
    run: RunSettings
    seed: int
    out_dir: str
    export: Optional[Callable[[Any, Path], None]] = None

    @property
    def metrics_file(self) -> Path:
        return Path(self.out_dir) / "train_metrics.jsonl"

    @property
    def final_dir(self) -> Path:
        return Path(self.out_dir) / "final"


def check_global_batch(job: "TrainJob", world: int) -> None:
    """Every worker takes the same number of rows per step (the launcher checks it before
    starting Ray; the loop again, for direct use)."""
    if job.schedule.global_batch % world:
        raise UserError(f"{job.name}: global_batch {job.schedule.global_batch} is not divisible "
                        f"by {world} workers; change resources.stages.{job.name}.num_workers or "
                        f"the global batch")


def train(job: TrainJob, runtime: Any) -> dict[str, Any]:
    """Run (or resume) `job` to its last step; rank 0 exports the model to `job.final_dir`.

    Args:
        job: what to train.
        runtime: `LocalRuntime` or `RayRuntime` (rank, world size, checkpoint I/O).

    Returns:
        Summary: steps, resumed_from, last train/val metrics.
    """
    import torch

    rank, world = runtime.rank, runtime.world_size
    sched, run = job.schedule, job.run
    check_global_batch(job, world)
    device = _device()
    torch.manual_seed(job.seed)                   # identical initial weights on every rank
    # FSDP: built on the meta device, sharded by _wrap, then each rank fills its own shards
    model = meta_model(job.model) if run.fsdp and world > 1 and _distributed() else None
    on_meta = model is not None
    if run.fsdp and world > 1 and device.type == "cpu":
        return_large_frees_to_os()            # freed unit gathers leave the RSS
    model = model if on_meta else _fp32_masters(job.model())
    apply_activation_checkpointing(model, run.activation_checkpointing,
                                   f"resources.stages.{job.name}.activation_checkpointing")
    resume = contextlib.ExitStack()           # the checkpoint stays readable until loaded
    ckpt = resume.enter_context(runtime.latest_checkpoint())
    start, last_metrics = resume_point(ckpt)
    if not on_meta:
        model.to(device)
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"{job.name}: the freeze policy leaves no trainable parameter")
    policy = PrecisionPolicy(_resolve_precision(run.precision, device), run.fsdp and world > 1)
    unused = run.find_unused_parameters
    if unused is None:
        unused = _unused_parameters(model, job, start, rank, world, device) \
            if world > 1 and not run.fsdp and not policy.by_hand else False
    wrapped = _wrap(model, run.fsdp, world, device, find_unused=unused, policy=policy)
    if on_meta:
        materialise(wrapped, job.seed, device)
    params = [p for p in wrapped.parameters() if p.requires_grad]   # FSDP2 swaps in DTensors
    optimizer = torch.optim.AdamW(_param_groups(wrapped, sched.weight_decay), lr=sched.lr,
                                  betas=sched.betas, fused=False)
    with resume:
        if ckpt is not None:      # any world size's shards, resharded (dcp.py)
            load_checkpoint(ckpt, wrapped, optimizer, job.name)
    log = _MetricsWriter(job.metrics_file if rank == 0 else None)
    if start:
        log.write({"kind": "resume", "step": start})

    train_rows = job.train_data()
    val_rows = job.val_data() if job.val_data and run.eval_batches else None
    sampler = GlobalBatchSampler(len(train_rows), sched.global_batch, job.seed)
    precision = _resolve_precision(run.precision, device, log)
    compute = policy.compute(wrapped, world)   # bf16: bf16 weights for forward/backward
    autocast = compute.context()
    timer = Timings()                       # where the time goes: the stage's manifest
    for step in range(start, sched.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        lr = sched.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(_step_seed(job.seed, step, rank))
        with timer("data"):
            batch = train_rows.batch(sampler.batch(step)[rank::world])
        n_tok = _all_sum(batch["loss_mask"].sum().double(), world)
        loss_sum = torch.zeros((), dtype=torch.float64)
        micro = _micro_batches(batch, run.micro_batch)
        for i, mb in enumerate(micro):
            with _grad_sync(wrapped, enabled=i == len(micro) - 1), autocast:
                with timer("forward"):
                    s = _loss_sum(compute.model, mb, device)
                with timer("backward"):
                    (s * (world / max(float(n_tok), 1.0))).backward()
                    compute.after_backward()   # bf16 grads -> the fp32 masters
            loss_sum += s.detach().double().cpu()
        loss = float(_all_sum(loss_sum, world)) / max(float(n_tok), 1.0)
        with timer("optimizer"):
            compute.before_step()
            grad_norm = _clip(wrapped, params, sched.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            compute.after_step()
        dt = time.perf_counter() - t0
        done = step + 1
        metrics = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": sched.global_batch * train_rows.seq_length / dt,
                   "cpu_s": time.process_time() - c0,
                   "loss_tokens": float(n_tok)}
        log.write({"kind": "train", **metrics})
        last_metrics.update(train_loss=loss)
        if val_rows is not None and (done % run.eval_interval == 0 or done == sched.steps):
            with timer("eval"):
                val = evaluate(compute.model, val_rows, run, sched.global_batch, rank, world,
                               device)
            log.write({"kind": "eval", "step": done, **val})
            last_metrics.update(val)
        if done % run.checkpoint_interval == 0 or done == sched.steps:
            with timer("checkpoint"):
                _checkpoint(runtime, wrapped, optimizer, job, done, last_metrics, metrics)
    with timer("io"):
        _export(job, wrapped, rank, sharded=run.fsdp and world > 1 and _distributed())
    return {"steps": sched.steps, "resumed_from": start, "precision": precision,
            "time_s": timer.as_dict(), **last_metrics}


def evaluate(model: Any, rows: TokenRows, run: RunSettings, global_batch: int, rank: int,
             world: int, device: Any) -> dict[str, float]:
    """Token-weighted validation loss and perplexity over the first eval rows (fixed order)."""
    import torch


    n = min(len(rows), run.eval_batches * global_batch)
    # Every rank runs the same forwards (FSDP all-gathers, DDP buffer syncs are collective):
    # rank r scores rows r, r+W, ...; the last round pads with row 0, masked out of the loss.
    per_rank = -(-n // world)
    idx = np.arange(per_rank) * world + rank
    real = idx < n
    idx = np.where(real, idx, 0)
    total = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    was_training = model.training
    model.eval()
    with torch.no_grad(), _autocast(device, _resolve_precision(run.precision, device)):
        for start in range(0, per_rank, run.micro_batch):
            mb = rows.batch(idx[start:start + run.micro_batch])
            keep = torch.from_numpy(real[start:start + run.micro_batch])
            mb["loss_mask"] = mb["loss_mask"] * keep[:, None].to(mb["loss_mask"].dtype)
            total += _loss_sum(model, mb, device).double().cpu()
            count += mb["loss_mask"].sum().double()
    model.train(was_training)
    total, count = _all_sum(total, world), _all_sum(count, world)
    loss = float(total / max(float(count), 1.0))
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


# ------------------------------------------------------------------------------ pieces
def _device() -> Any:
    import torch

    try:
        import ray.train.torch

        return ray.train.torch.get_device()
    except Exception:  # noqa: BLE001 - not inside a Ray Train worker
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve_precision(requested: str, device: Any, log: "_MetricsWriter | None" = None) -> str:
    """The spec's precision on this worker's device; rank 0 tells the stage (a `precision`
    row: the stage log shows it, with the warning for bf16 on hardware without fast bf16)."""

    resolved = resolve_precision(requested, device)
    if log is not None:
        log.write({"kind": "precision", "requested": requested, "precision": resolved,
                   "hardware": hardware_text(device.type),
                   "warning": precision_warning(requested, device)})
    return resolved


def _autocast(device: Any, precision: str) -> Any:
    """bf16 autocast on CPU and GPU alike (fp32 master weights and optimizer state; the loss
    is computed from fp32 logits in `_loss_sum`)."""

    return autocast(precision, device)


def _fp32_masters(model: Any) -> Any:
    """Master weights (and so AdamW state) in fp32 whatever a builder loaded: bf16 masters
    round small updates away (at lr 9e-6 most weights would never change); compute precision
    is autocast's business."""
    import torch

    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 4099 + rank) % (2**63 - 1)


def _unused_parameters(model: Any, job: TrainJob, step: int, rank: int, world: int,
                       device: Any) -> bool:
    """Whether some trainable parameter takes no part in the loss on any rank (gate 0 or no
    neighbours with a trainable encoder / CCA): DDP then needs `find_unused_parameters`.

    One forward of this rank's first micro-batch, then a walk of its autograd graph (what DDP
    itself does every step with the flag on); the ranks agree through an all-reduce."""
    import torch

    rows = job.train_data()
    sampler = GlobalBatchSampler(len(rows), job.schedule.global_batch, job.seed)
    mb = _micro_batches(rows.batch(sampler.batch(step)[rank::world]), job.run.micro_batch)[0]
    trainable = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.train()
    try:
        reached = _graph_leaves(_loss_sum(model, mb, device))
    finally:
        model.train(was_training)
    used = torch.tensor([float(id(p) in reached) for p in trainable], dtype=torch.float64)
    used = _all_sum(used, world)
    return bool((used == 0).any())


def _graph_leaves(loss: Any) -> set[int]:
    """ids of the leaf tensors (parameters) the autograd graph of `loss` reaches."""
    seen, leaves, todo = set(), set(), [loss.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)      # AccumulateGrad: a leaf
        if var is not None:
            leaves.add(id(var))
        todo.extend(next_fn for next_fn, _ in fn.next_functions)
    return leaves


def _wrap(model: Any, fsdp: bool, world: int, device: Any, find_unused: bool = False,
          policy: PrecisionPolicy | None = None) -> Any:
    """DDP (or FSDP2 when asked) across the process group; the bare model when alone.
    `find_unused`: some trainable parameter gets no gradient (see `_unused_parameters`).
    `policy`: bf16 gives every `fully_shard` its mixed-precision policy; without FSDP the
    bf16 copy syncs gradients itself (`precision_policy.Bf16Compute`), so no DDP."""
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        mp = policy.fsdp_kwargs() if policy is not None else {}
        for module in _shard_units(model):
            fully_shard(module, **mp)
        fully_shard(model, **mp)  # the root holds the rest: embeddings, tied head, final norms
        return model
    if policy is not None and policy.by_hand:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=find_unused)


def _shard_units(model: Any) -> list:
    """FSDP units, each gathered only while it runs, so the root (gathered for the whole step)
    keeps only the input embeddings (entered again by the neighbours' lookup), a tied head and
    the final norms:

    - the sub-modules of each decoder block (the first ModuleList found): Retro runs a block's
      attention, norms and MLP one by one rather than the block's own forward, so the units are
      those children, each entered through its forward (where FSDP2 gathers its parameters); a
      whole block would never be;
    - for Retro, the children of each encoder layer and each CCA's norm and attention;
    - an untied output head.

    On the 316M bench model these finer units cut the 2-worker peak RSS by 0.3 GB against
    decoder-block units alone (docs/benchmarks.md, "FSDP2 per-worker memory")."""
    units = _block_units(model)
    encoder = getattr(model, "encoder", None)
    if encoder is not None:
        units += [child for layer in encoder.layers for child in layer.children()
                  if any(True for _ in child.parameters())]
        units += [part for cca in model.cca.values() for part in (cca.norm, cca.attn)]
    decoder = getattr(model, "decoder", model)
    head = decoder.get_output_embeddings() if hasattr(decoder, "get_output_embeddings") else None
    if head is not None and head.weight is not decoder.get_input_embeddings().weight:
        units.append(head)
    return units


def _block_units(model: Any) -> list:
    """The sub-modules of each decoder block (the first ModuleList found) that hold weights."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return [child for block in module for child in block.children()
                    if any(True for _ in child.parameters())]
    return []


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)


def _param_groups(model: Any, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in _unwrap(model).named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _grad_sync(model: Any, enabled: bool) -> Any:
    if hasattr(model, "no_sync"):                       # DDP
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):    # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def _micro_batches(batch: dict[str, Any], size: int) -> list[dict[str, Any]]:
    n = len(batch["input_ids"])
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def _loss_sum(model: Any, mb: dict[str, Any], device: Any) -> Any:
    """Summed cross-entropy over the positions whose loss_mask is 1 (fp32)."""
    import torch.nn.functional as F

    kwargs = {"input_ids": mb["input_ids"].to(device)}
    if "neighbours" in mb:
        kwargs["neighbours"] = mb["neighbours"].to(device)
    logits = model(**kwargs).logits
    ce = F.cross_entropy(logits.float().flatten(0, 1), mb["labels"].to(device).flatten(),
                         reduction="none")
    return (ce * mb["loss_mask"].to(device).flatten()).sum()


def _all_sum(t: Any, world: int) -> Any:
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        t = t.clone().to(_comm_device())
        dist.all_reduce(t)
        return t.cpu()
    return t


def _comm_device() -> Any:
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")


def _clip(model: Any, params: list, max_norm: float) -> float:
    import torch

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):                    # FSDP2 DTensor
        norm = norm.full_tensor()
    return float(norm)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _checkpoint(runtime: Any, model: Any, optimizer: Any, job: TrainJob, step: int,
                last: dict, metrics: dict) -> None:
    """Collective: every rank writes its own shards (dcp.py), never the full state."""
    save_checkpoint(runtime, model, optimizer, {
        "step": step, "samples_seen": step * job.schedule.global_batch,
        "seed": job.seed, "world_size": runtime.world_size, "metrics": last}, metrics)


def _export(job: TrainJob, wrapped: Any, rank: int, sharded: bool) -> None:
    """Rank 0 writes the trained model; sharded weights stream out one tensor at a time
    (sharded_export.py: no rank gathers the whole model)."""
    if sharded:
        export_sharded(wrapped, job.final_dir, rank, job.export,
                       max_shard_bytes=job.run.export_shard_bytes)
        return
    if rank != 0:
        return
    shutil.rmtree(job.final_dir, ignore_errors=True)
    (job.export or _save_pretrained)(_unwrap(wrapped), job.final_dir)


def _save_pretrained(model: Any, path: Path) -> None:
    model.save_pretrained(str(path))


class _MetricsWriter:
    """Rank 0 appends one JSON line per event; the stage process tails the file."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        if self.path is None:
            return
        line = json.dumps({**row, "time": time.time()}, default=float) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())   # one append: a killed writer leaves no half line
        finally:
            os.close(fd)
