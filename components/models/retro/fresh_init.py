"""Random initialisation that does not depend on how (or where) the model was built.

`seeded_init(model, seed)` initialises every module from its own generator, seeded by
(seed, the module's qualified name), with the module's usual init: transformers'
`_init_weights` for the decoder's modules (normal(0, initializer_range) linears and embeddings,
norms at 1, rotary buffers), Megatron's for the Retro encoder and CCA (`_init_fresh`).
A module's values then depend only on (seed, name, shape), not on the order in which modules
were built or on which ones were loaded from a checkpoint, so a model built on the meta device
and materialised shard by shard (`training/sharded.py`, every rank initialising its own rows)
equals the dense build bit for bit.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable

def module_seed(seed: int, name: str) -> int:
    """A 63-bit seed for module `name` (stable across processes and Python versions)."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_init(model: Any, seed: int, loaded: Iterable[str] = ()) -> None:
    """Initialise `model` in place, module by module (children before parents).

    Args:
        model: a RetroForCausalLM, or a transformers PreTrainedModel.
        seed: the run's seed.
        loaded: names of parameters that come from a checkpoint: a module all of whose
            parameters are loaded and that has no buffers is skipped (its values come from
            the file; the other modules' values do not depend on it).
    """
    import torch

    loaded = set(loaded)
    loaded_ids = {id(p) for n, p in model.named_parameters(remove_duplicate=False)
                  if n in loaded}          # a tied weight is loaded under any of its names
    for p in model.parameters():    # transformers skips tensors flagged as initialised
        if hasattr(p, "_is_hf_initialized"):
            del p._is_hf_initialized
    modules = list(model.named_modules())
    with torch.no_grad():
        # children before parents, as transformers' `apply`: a parent (GPT-2's attention,
        # which rescales its c_proj) has the last word over its children
        for name, module in reversed(modules):
            has_buffers = any(True for _ in module.buffers(recurse=False))
            if not has_buffers and all(id(p) in loaded_ids for p in module.parameters()):
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(module_seed(seed, name))
                _init_module(model, name, module)


def _init_module(root: Any, name: str, module: Any) -> None:
    import torch.nn as nn

    from retro.components.models.retro.modeling_retro import RetroForCausalLM, RMSNorm, Rotary

    if not isinstance(root, RetroForCausalLM):
        root._init_weights(module)                  # a transformers model of its own
        return
    if name == "decoder" or name.startswith("decoder."):
        root.decoder._init_weights(module)
        return
    if isinstance(module, nn.Linear):
        root._init_fresh(name, module)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)
    elif isinstance(module, nn.LayerNorm):
        module.reset_parameters()
    elif isinstance(module, Rotary):
        module.inv_freq.copy_(module.frequencies())
