"""Export an FSDP2-sharded model as a consolidated, loadable checkpoint without gathering it.

Every rank walks the state dict together, gathering one tensor at a time (`full_tensor`, a
collective); rank 0 appends it to the current safetensors shard and writes the shard once it
reaches `max_shard_bytes`, so rank 0 holds at most one shard plus one tensor. The layout is the
one `RetroForCausalLM.save_pretrained` writes, with transformers' sharded naming:
`decoder/model-00001-of-0000N.safetensors` + `decoder/model.safetensors.index.json` (or
`decoder/model.safetensors` when one shard holds it all), the encoder + CCA as
`retro.safetensors` (or `retro-0000i-of-0000N.safetensors` + `retro.safetensors.index.json`),
then the configs and the stage's extra files through the job's usual export function, handed a
view of the model whose `save_pretrained` writes configs only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

DEFAULT_SHARD_BYTES = 2 * 2**30


def export_sharded(model: Any, path: Path, rank: int,
                   export: Optional[Callable[[Any, Path], None]] = None,
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Collective: write `model` (sharded or not) to `path` from rank 0, streamed.

    Args:
        model: the (FSDP2-wrapped) model.
        path: the export directory (replaced).
        rank: this process's rank; only rank 0 writes.
        export: the job's export function `(model, path)`; None: `save_pretrained`.
        max_shard_bytes: safetensors shard size.
    """
    path = Path(path)
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    writers: dict[tuple[str, str], _ShardWriter] = {}
    for key, tensor in _unique_state(model):
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        if rank == 0:
            folder, stem, name = _place(model, key)
            w = writers.get((folder, stem))
            if w is None:
                w = writers[(folder, stem)] = _ShardWriter(path / folder, stem, max_shard_bytes)
            w.add(name, full.detach().cpu().contiguous())
        del full
    if rank != 0:
        return
    for w in writers.values():
        w.close()
    (export or _save_pretrained)(ConfigsOnly(model), path)


def _unique_state(model: Any):
    """(key, tensor) of the state dict, a tied tensor once (under its first name, as
    transformers' `save_pretrained` keeps `embed_tokens` and drops the tied `lm_head`)."""
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        yield key, tensor


def _place(model: Any, key: str) -> tuple[str, str, str]:
    """(sub-folder, file stem, key in the file) of a state-dict key."""
    from retro.components.models.retro.modeling_retro import RetroForCausalLM

    if isinstance(model, RetroForCausalLM):
        if key.startswith("decoder."):
            return "decoder", "model", key[len("decoder."):]
        return "", "retro", key
    return "", "model", key


class _ShardWriter:
    """Appends tensors to `<stem>` shards of at most `max_bytes`; `close` names them."""

    def __init__(self, folder: Path, stem: str, max_bytes: int):
        self.folder, self.stem, self.max_bytes = folder, stem, max_bytes
        self.buffer: dict[str, Any] = {}
        self.size = self.total = 0
        self.files: list[tuple[Path, list[str]]] = []
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, tensor: Any) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.size + nbytes > self.max_bytes:
            self._flush()
        self.buffer[name] = tensor
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp = self.folder / f".{self.stem}-{len(self.files):05d}.tmp"
        save_file(self.buffer, str(tmp), metadata={"format": "pt"})
        self.files.append((tmp, list(self.buffer)))
        self.buffer, self.size = {}, 0

    def close(self) -> None:
        if self.buffer or not self.files:
            self._flush()
        n = len(self.files)
        if n == 1:
            os.replace(self.files[0][0], self.folder / f"{self.stem}.safetensors")
            return
        weight_map = {}
        for i, (tmp, names) in enumerate(self.files, start=1):
            name = f"{self.stem}-{i:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, self.folder / name)
            weight_map.update({k: name for k in names})
        (self.folder / f"{self.stem}.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2))


class ConfigsOnly:
    """The model as the job's export function sees it after a streamed export: attributes
    pass through (e.g. the `gate` it sets), `save_pretrained` writes the configs only."""

    def __init__(self, model: Any):
        object.__setattr__(self, "_model", model)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._model, name, value)

    def save_pretrained(self, path: Any) -> Any:
        from retro.components.models.retro.modeling_retro import RetroForCausalLM

        if isinstance(self._model, RetroForCausalLM):
            return self._model.save_pretrained(path, weights=False)
        self._model.config.save_pretrained(path)
        if getattr(self._model, "generation_config", None) is not None:
            self._model.generation_config.save_pretrained(path)
        return Path(path)


def _save_pretrained(model: Any, path: Path) -> None:
    model.save_pretrained(str(path))
