"""Inference attention on CPU: bf16 operands computed in fp32, one-token decode steps packed.

Measured on this CPU (1 thread, `torch.nn.functional.scaled_dot_product_attention`): a decode
step's attention, query [1, 9, 1, 64] over 850 cached keys, takes 0.69 ms in bf16 (the CPU
flash kernel) vs 0.11 ms in fp32, 0.18 ms with the bf16 operands upcast; a prefill over the same
850 tokens costs the same in both (19.7 vs 19.9 ms). So bf16 attention gains nothing on CPU and
makes KV-cached decoding several times slower: under `inference_autocast` the attention of
every decoder (transformers' own through a registered attention function, Retro's encoder and
CCA through `Attention.fp32_cpu`) upcasts its operands and returns the input dtype. Training
keeps the plain kernels (forward + backward cost the same in both there)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

HF_NAME = "retro_fp32_cpu_sdpa"


def needs_upcast(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype == torch.bfloat16


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None,
         **kwargs: Any) -> torch.Tensor:
    """`scaled_dot_product_attention` in fp32 for bf16 CPU operands (same dtype back)."""
    if not needs_upcast(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.float()
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                          **kwargs).to(q.dtype)


def _hf_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type == "cpu" and query.shape[2] == 1 and not module.training:
        return _decode_step(module, query, key, value, attention_mask, kwargs.get("scaling"))
    if not needs_upcast(query):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                          attention_mask, **kwargs)
    return out.to(query.dtype), weights


def _decode_step(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 mask: Any, scaling: Any) -> tuple[torch.Tensor, None]:
    """One query token: the query heads that share a key/value head become that head's query
    rows ([b, h, 1, d] -> [b, h_kv, g, d]), one SDPA call without `enable_gqa`. transformers
    takes `enable_gqa` whenever torch has it; on CPU that kernel is ~9x slower at one query
    (0.65 vs 0.07 ms in bf16, 850 keys, 9 / 3 heads), and this packing is transformers' own
    fallback (`pack_gqa`), so the numbers are the same attention."""
    b, heads, _, dim = query.shape
    groups = getattr(module, "num_key_value_groups", 1)
    q = query.reshape(b, heads // groups, groups, dim)
    if mask is not None and mask.shape[1] != 1:                 # per-head masks
        mask = mask.reshape(b, heads // groups, groups, -1)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, heads, 1, dim).transpose(1, 2).contiguous(), None


def use_fp32_cpu_attention(model: torch.nn.Module) -> None:
    """Switch every attention of `model` (inference only) to fp32-on-CPU attention."""
    from transformers import AttentionInterface, PreTrainedModel

    from retro.components.models.retro.modeling_retro import Attention

    AttentionInterface.register(HF_NAME, _hf_attention)
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and \
                module.config._attn_implementation in ("sdpa", HF_NAME):
            module.config._attn_implementation_internal = HF_NAME
        elif isinstance(module, Attention):
            module.fp32_cpu = True
