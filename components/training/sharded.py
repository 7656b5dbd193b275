"""FSDP2 without any rank holding the whole model: build on the meta device, shard, then
materialise each rank's own rows.

1. `meta_model(builder)`: the builder (`models.build_fresh` / `models.load_trained` partials,
   whose `device="meta"` builds allocate nothing) gives the model on the meta device, with
   `weight_sources` naming the safetensors folders its loaded weights come from.
2. The loop shards it (`loop._wrap`: `fully_shard` per unit, then the root).
3. `materialise(model, seed, device)`: `to_empty` allocates each rank's shards only; the
   per-module seeded init (`models/retro/fresh_init.py`, the same one a dense build runs) is
   run with every write to a parameter redirected (`_ShardWrites`): the init runs on a full-size
   scratch of that one parameter and the rank keeps its rows, so the shards hold exactly the
   dense values; then each rank reads, from the safetensors files, only the rows of its shards
   (`safe_open(...).get_slice`), one tensor at a time. Peak extra memory: one parameter.

Builders that cannot build on the meta device (a lambda, a plain transformers folder) keep the
dense path: every rank builds the model, then FSDP shards it.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any, Callable, Optional

# in-place init ops that overwrite the whole tensor: run on a scratch, the rank keeps its rows
_OVERWRITES = {"normal_", "uniform_", "zero_", "zeros_", "ones_", "fill_", "constant_",
               "copy_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
               "xavier_uniform_", "xavier_normal_"}


def meta_model(builder: Callable[..., Any]) -> Optional[Any]:
    """The builder's model on the meta device, or None if the builder cannot build there
    (then the dense build is used)."""
    func = builder.func if isinstance(builder, functools.partial) else builder
    try:
        takes_device = "device" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return None
    if not takes_device:
        return None
    model = builder(device="meta")
    if not hasattr(model, "weight_sources"):
        return None
    return model


def materialise(model: Any, seed: int, device: Any) -> Any:
    """Allocate and fill the local shards of a sharded meta-device model (see module doc)."""
    import torch

    from retro.components.models.retro.fresh_init import seeded_init

    sources = [(prefix, Path(folder)) for prefix, folder in getattr(model, "weight_sources", [])]
    names = {n for n, _ in model.named_parameters()}
    files = {prefix: _weight_map(folder) for prefix, folder in sources}
    loaded = {n for n in names for prefix, keys in files.items()
              if n.startswith(prefix) and n[len(prefix):] in keys}
    model.to_empty(device=device)
    with torch.no_grad(), _ShardWrites(model):
        seeded_init(model, seed, loaded=loaded)
    with torch.no_grad():
        for prefix, folder in sources:
            _stream(model, prefix, folder, files[prefix], device)
    return model


def local_rows(param: Any) -> tuple[int, int]:
    """The [start, stop) rows of dim 0 this rank holds of a DTensor parameter (Shard(0))."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return 0, param.shape[0] if param.dim() else 1
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                          param.placements)
    if param.dim() == 0:
        return 0, 1
    return offset[0], offset[0] + shape[0]


def _local(param: Any) -> Any:
    return param.to_local() if hasattr(param, "to_local") else param


class _ShardWrites:
    """While active, an in-place init op on a parameter runs on a full-size scratch copy of
    that parameter (so it draws exactly the random numbers the dense init draws) and the
    parameter's local shard takes its own rows."""

    def __init__(self, model: Any):
        import torch
        from torch.overrides import TorchFunctionMode

        params = {id(p): (n, p) for n, p in model.named_parameters()}

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                target = args[0] if args else kwargs.get("tensor")
                hit = params.get(id(target)) if isinstance(target, torch.Tensor) else None
                name = getattr(func, "__name__", "")
                if hit is None or not name.endswith("_") or name.endswith("__"):
                    return func(*args, **kwargs)
                if name not in _OVERWRITES:
                    raise NotImplementedError(
                        f"sharded init: {name} on {hit[0]} does not overwrite the whole "
                        "parameter; build this model densely (fsdp off) or extend _OVERWRITES")
                scratch = torch.empty(tuple(target.shape), dtype=target.dtype)
                if args:
                    args = (scratch, *args[1:])
                else:
                    kwargs = {**kwargs, "tensor": scratch}
                func(*args, **kwargs)
                lo, hi = local_rows(target)
                local = _local(target)
                local.copy_(scratch.reshape(-1)[lo:hi] if target.dim() == 0 else scratch[lo:hi])
                return target

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> safetensors file of a folder: from its `*.safetensors.index.json`
    (sharded checkpoints) or, without one, from the files' headers."""
    from safetensors import safe_open

    out: dict[str, str] = {}
    for index in sorted(folder.glob("*.safetensors.index.json")):
        out.update(json.loads(index.read_text())["weight_map"])
    listed = set(out.values())
    for f in sorted(folder.glob("*.safetensors")):
        if f.name in listed:
            continue
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: f.name for k in fh.keys()})
    return out


def _stream(model: Any, prefix: str, folder: Path, keys: dict[str, str], device: Any) -> None:
    """Copy each parameter's local rows from the safetensors files (one slice at a time)."""
    from safetensors import safe_open

    by_file: dict[str, list[tuple[str, Any]]] = {}
    for name, p in model.named_parameters():
        if name.startswith(prefix) and name[len(prefix):] in keys:
            by_file.setdefault(keys[name[len(prefix):]], []).append((name, p))
    for file, params in by_file.items():
        with safe_open(str(folder / file), framework="pt") as fh:
            for name, p in params:
                key = name[len(prefix):]
                sl = fh.get_slice(key)
                if tuple(sl.get_shape()) != tuple(p.shape):
                    from retro.platform.errors import InputDataError

                    raise InputDataError(f"{folder / file}: {key} has shape "
                                         f"{tuple(sl.get_shape())}, the model {tuple(p.shape)}")
                lo, hi = local_rows(p)
                rows = sl[lo:hi] if p.dim() else sl[:]
                _local(p).copy_(rows.to(device=device, dtype=p.dtype))


MMAP_THRESHOLD = 1 << 20
"""Bytes: host allocations at least this large are mmapped, so freeing them returns the
memory to the OS (see `return_large_frees_to_os`)."""


def return_large_frees_to_os(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (what `MALLOC_MMAP_THRESHOLD_` does, set from inside a
    running worker). glibc's default threshold grows with every large free up to 32 MB, so
    FSDP's per-unit all-gather buffers (1-32 MB each, freed after every unit) stay in the heap
    and a CPU worker's RSS holds about one gathered copy of every unit. Fixed at 1 MiB, they go
    back to the OS; CUDA memory is not affected. Returns False where there is no glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        return False
    if mallopt is None:
        return False
    M_MMAP_THRESHOLD = -3
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))
