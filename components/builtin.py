"""Registers retro's built-in components (entry point `retro.components:builtin`).

Component modules keep torch, faiss, transformers and ray imports inside functions, so loading
them all costs milliseconds and `retro validate` stays fast.
"""

import importlib

MODULES = [
    "retro.components.trackers.basic",
    "retro.components.training.config",
    "retro.components.training.stages",
    "retro.components.instruct.config",
    "retro.components.instruct.sources",
    "retro.components.instruct.stage",
    "retro.components.trackers.wandb_tracker",
    "retro.components.models.retro.component",
    "retro.components.models.retro.checkpoints",
]


def register_all() -> None:
    """Import the modules whose decorators register built-in components."""
    for name in MODULES:
        importlib.import_module(name)
