"""Resumable checkpoints with `torch.distributed.checkpoint` (DCP): every rank writes its own
shards, and any world size reads them back.

A checkpoint directory holds DCP's files (`__<rank>_0.distcp` per rank, `.metadata` from rank
0, written last) with two state dicts, keyed by parameter name (so valid for any worker count):
- `model`: the model state (FSDP2: each rank's DTensor shards; DDP / one worker: the tensors,
  saved once);
- `optim`: the AdamW state (`get_optimizer_state_dict`, same sharding);
plus `trainer_state.json` from rank 0: the step reached (the data position and the LR
schedule's position: both are pure functions of the step), samples seen, the seed, the world
size that wrote it and the last metrics. Random state needs no file: the loop reseeds torch from
(seed, step, rank) at every step.

Where the directory lives and how it appears atomically is the runtime's business
(`checkpoint.LocalRuntime` / `RayRuntime`): ranks write into a scratch directory, which only
becomes a checkpoint once all of them are done.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

from retro.platform.errors import UserError

STATE_FILE = "trainer_state.json"
METADATA_FILE = ".metadata"


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _quiet():
    """DCP warns that it 'assumes' one process when there is no process group: we say so."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def sharded_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """{"model", "optim"}: this rank's part of the state (sharded under FSDP2), by name."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def save_checkpoint(runtime: Any, model: Any, optimizer: Any, state: dict[str, Any],
                    metrics: dict[str, Any]) -> None:
    """Collective: every rank writes its shards into the runtime's scratch directory, rank 0
    the trainer state; the runtime then publishes the directory as the step's checkpoint."""
    import torch.distributed.checkpoint as dcp

    step = int(state["step"])
    path = runtime.scratch(step)
    with _quiet():
        dcp.save(sharded_state(model, optimizer), checkpoint_id=str(path),
                 no_dist=not _distributed())
    if runtime.rank == 0:
        (Path(path) / STATE_FILE).write_text(json.dumps(state, indent=2, default=float))
    runtime.report({**metrics, "step": step}, path)


def resume_point(path: Path | None) -> tuple[int, dict[str, Any]]:
    """(step, last metrics) of a checkpoint directory; (0, {}) without one."""
    if path is None:
        return 0, {}
    state = json.loads((Path(path) / STATE_FILE).read_text())
    return int(state["step"]), state.get("metrics", {})


def load_checkpoint(path: Path, model: Any, optimizer: Any, job_name: str) -> None:
    """Collective: read a checkpoint written by any world size into this rank's shards (DCP
    reshards), after checking its tensors fit the model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = sharded_state(model, optimizer)
    _check_fits(Path(path), state["model"], job_name)
    with _quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=not _distributed())
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])


def _check_fits(path: Path, model_state: dict[str, Any], job_name: str) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    if not (path / METADATA_FILE).is_file():
        raise UserError(f"checkpoint {path} does not match the model: it is not a DCP checkpoint "
                        f"(written by an older retro); remove the stage's work dir to start "
                        f"over")
    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing, bad = [], []
    for k, v in model_state.items():
        meta = saved.get(f"model.{k}")
        if meta is None:
            missing.append(k)
        elif hasattr(meta, "size") and tuple(meta.size) != tuple(v.shape):
            bad.append(f"{k}: {tuple(meta.size)} vs {tuple(v.shape)}")
    if missing or bad:
        raise UserError(f"{job_name}: checkpoint {path} does not match the model: missing "
                        f"{missing[:5]}, wrong shapes {bad[:5]}; the spec's model changed since "
                        "it was written (remove the stage's work dir to start over)")


def read_checkpoint(path: Path) -> tuple[dict, dict, dict[str, Any]]:
    """(full model state dict, full optimizer state dict, trainer state) of a checkpoint
    directory, in one process (inspection and tests; the loop resumes with `load_checkpoint`)."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(path), str(Path(tmp) / "full.pt"))
        full = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=False)
    return full["model"], full["optim"], json.loads((path / STATE_FILE).read_text())


def local_bytes(state: Any) -> int:
    """Bytes of the tensors this rank holds in a (nested) state dict: a DTensor counts its
    local shard only."""
    import torch

    if isinstance(state, dict):
        return sum(local_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(local_bytes(v) for v in state)
    if isinstance(state, torch.Tensor):
        t = state.to_local() if hasattr(state, "to_local") else state
        return t.numel() * t.element_size()
    return 0
