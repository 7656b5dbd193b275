"""Which device a stage computes on: its GPU when the spec gave it one and CUDA is present.

`resources.<stage>.gpus_per_worker > 0` is how a spec lends a stage a GPU (Ray reserves it and
sets CUDA_VISIBLE_DEVICES); without CUDA (a CPU-only host, or torch built without it) the stage
runs on CPU as before, so specs with GPUs still run, slower, on a laptop. torch is imported
inside functions only.
"""

from __future__ import annotations

from typing import Any


def stage_gpus(ctx: Any) -> float:
    """GPUs the spec gave this stage's workers (`resources.<stage>.gpus_per_worker`)."""
    return float(getattr(getattr(ctx, "resources", None), "gpus_per_worker", 0.0) or 0.0)


def stage_device(ctx: Any) -> str:
    """"cuda" when the stage was given GPUs and torch sees CUDA, else "cpu"."""
    if stage_gpus(ctx) <= 0:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def faiss_gpus(ctx: Any) -> int:
    """GPUs a faiss index may use in this stage: faiss' count (0 for faiss-cpu) when the
    stage was given GPUs, else 0 (so a CPU stage never takes a GPU a trainer holds)."""
    if stage_gpus(ctx) <= 0:
        return 0
    import faiss

    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def module_device(model: Any) -> Any:
    """The device a model computes on: its first parameter's (CPU for one without any), where
    its callers move their inputs."""
    import torch

    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if params is not None else None
    return first.device if first is not None else torch.device("cpu")
