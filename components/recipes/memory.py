"""`retro plan`'s per-device memory rows for a recipe's training stages (the arithmetic is
`components/training/memory.py`; this reads the spec and the stage's resources)."""

from __future__ import annotations

import functools
import json
from typing import Any

from retro.components.training.memory import (ModelShape, Workload, checkpoint_every,
                                              model_shape, plan_rows, retrieved_length)
from retro.components.models.retro.build import build_model
from retro.platform.plan import stage_resources
from retro.platform.registry import registry

FIT_STAGES = {"gpt-pretrain": False, "retro-fit": True, "gpt-fit": False}
"""Pretraining-data training stage -> whether it trains the Retro model."""
INSTRUCT_STAGES = {"instruct-retro": True, "instruct-gpt": False}


def memory_info(spec: Any, name: str, vocab_size: int | None,
                neighbours: int | None) -> dict[str, str]:
    """Memory rows of training call `name` ({} for any other stage or without a model)."""

    if spec.model is None or spec.model.type != "retro":
        return {}
    if name in FIT_STAGES and spec.pretrain is not None:
        retro, trainer = FIT_STAGES[name], spec.pretrain
        seq, k = trainer.seq_length, (neighbours or 0) if FIT_STAGES[name] else 0
    elif name in INSTRUCT_STAGES and spec.instruct is not None:
        retro, trainer = INSTRUCT_STAGES[name], spec.instruct
        seq = trainer.seq_length or (spec.pretrain.seq_length if spec.pretrain else 2048)
        k = (neighbours or 0) if retro and trainer.retrieval else 0
    else:
        return {}
    res = stage_resources(spec.resources, name)
    node = spec.model.model_copy(update={"retro": retro})
    if node.preset is not None:      # the preset fixes the dims: no checkpoint to open
        node = node.model_copy(update={"init": None, "init_gguf": None})
    chunk = spec.retriever.chunk_length if spec.retriever is not None else 64
    try:
        shape = _shape(json.dumps(node.model_dump(mode="json"), sort_keys=True), vocab_size,
                       chunk)
    except Exception as e:  # noqa: BLE001 - dims from a checkpoint that is not here
        return {"memory/device": f"unknown ({type(e).__name__})"}
    precision = getattr(trainer, "precision", "auto")
    bf16 = precision == "bf16" or (precision == "auto" and res.gpus_per_worker > 0)
    work = Workload(seq=seq, micro_batch=getattr(trainer, "micro_batch", 1),
                    compute_bytes=2 if bf16 else 4, workers=res.num_workers, fsdp=res.fsdp,
                    checkpoint_every=checkpoint_every(res.activation_checkpointing),
                    neighbours=k, retrieved=retrieved_length(chunk))
    return plan_rows(shape, work, res)


@functools.lru_cache(maxsize=32)
def _shape(node_json: str, vocab_size: int | None, chunk: int) -> ModelShape:
    node = json.loads(node_json)
    cfg = registry.get("model", node.get("type", "retro")).node_model().model_validate(node)
    return model_shape(build_model(cfg, vocab_size, chunk, device="meta"))
