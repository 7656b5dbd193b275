"""Activation checkpointing per decoder block (issue 15 point 3): an execution setting.

`resources.default/stages.<name>.activation_checkpointing` (true: every block; N: blocks 1,
1 + N, 1 + 2N, ...; false: off) reaches the loop through `RunSettings` and never a stage's key:
recomputing a block in backward changes memory and time, not numbers (non-reentrant
`torch.utils.checkpoint`, RNG state replayed so dropout masks match).

A checkpointed block keeps its inputs only (hidden states, and for Retro the neighbour
embeddings and the encoder output the block hands on) and recomputes the rest in backward;
the first CCA block recomputes the encoder too. Works the same single-process, under DDP and
under FSDP2 (the recompute enters each FSDP unit's forward again, which gathers it again).
"""

from __future__ import annotations

from typing import Any

from retro.components.training.memory import checkpoint_every
from retro.platform.errors import UserError


def apply_activation_checkpointing(model: Any, setting: Any, where: str = "") -> int:
    """Turn checkpointing on in `model` per `setting` (bool or N); returns N (0: off).

    `RetroForCausalLM` (Retro, and the plain gpt2 / llama-family decoders it wraps, which is
    every model the training stages build) checkpoints its own blocks; another transformers
    model gets `gradient_checkpointing_enable` (every block only).

    Args:
        where: the spec path of the setting, for the error message.
    """
    every = checkpoint_every(setting)
    if hasattr(model, "set_activation_checkpointing"):
        model.set_activation_checkpointing(every)
        return every
    if not every:
        return 0
    if every == 1 and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return every
    raise UserError(f"{where or 'activation_checkpointing'}: {type(model).__name__} supports "
                    f"activation checkpointing of every block only (true), not every {every}")
