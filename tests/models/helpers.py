"""Shared helpers for the model tests: spec nodes and tiny random inputs."""

from __future__ import annotations

import torch

from retro.platform.registry import registry

registry.load_plugins()


def node(kind: str = "retro", **fields):
    """A validated `model` spec node."""
    return registry.get("model", kind).node_model().model_validate({"type": kind, **fields})


def tiny(**fields):
    """retro-nano (4 layers, 64 wide, CCA at 2 and 4) unless fields say otherwise."""
    return node(preset=fields.pop("preset", "retro-nano"), **fields)


def inputs(b=2, n=70, m=16, k=2, vocab=512, seed=0, chunks=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, n), generator=g)
    L = -(-n // m) if chunks is None else chunks
    nb = torch.randint(0, vocab, (b, L, k, 2 * m), generator=g)
    return ids, nb
