"""Greedy / top-k generation, with retrieval per completed chunk or without (gate 0).

Without retrieval (no `retrieve`, gate 0, or a plain decoder) the model is exactly its decoder,
so decoding runs the transformers decoder with a KV cache. With retrieval, every time a chunk of
m tokens completes (prompt chunks included) `retrieve(chunk_text)` returns its neighbours, and
each step re-runs the full Retro forward over the sequence so far (no cache: CCA outputs change
as chunks complete; fine at QA lengths).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence


@dataclass
class Generation:
    text: str
    """Decoded continuation, cut before the first stop sequence."""
    ids: list[int]
    """Generated token ids (the prompt excluded; stop-sequence tokens included)."""
    stop_reason: str
    """`stop_sequence`, `eos` or `max_new_tokens`."""
    retrieved_chunks: int = 0
    """How many chunks `retrieve` was called for."""
    neighbours: list = field(default_factory=list, repr=False)
    """Per completed chunk, the neighbour ids used ([k, r] lists)."""


def _pick(logits, top_k: Optional[int], temperature: float, generator) -> int:
    import torch

    if not top_k or top_k <= 1:
        return int(logits.argmax())
    values, indices = torch.topk(logits.float() / max(temperature, 1e-6), top_k)
    probs = torch.softmax(values, dim=-1)
    return int(indices[torch.multinomial(probs, 1, generator=generator)])


def _neighbour_tensor(per_chunk: list, pad: int = -1):
    """list (per chunk) of [k, r] id lists -> LongTensor [1, L, k_max, r_max], padded with -1."""
    import torch

    rows = [torch.as_tensor(x, dtype=torch.long).reshape(-1, torch.as_tensor(x).shape[-1])
            if x is not None and len(x) else torch.full((1, 1), pad, dtype=torch.long)
            for x in per_chunk]
    k = max(t.shape[0] for t in rows)
    r = max(t.shape[1] for t in rows)
    out = torch.full((1, len(rows), k, r), pad, dtype=torch.long)
    for j, t in enumerate(rows):
        out[0, j, : t.shape[0], : t.shape[1]] = t
    return out


def generate(model, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int = 64,
             stop_sequences: Sequence[str] = (), retrieve: Optional[Callable] = None,
             gate: Optional[float] = None, top_k: Optional[int] = None, temperature: float = 1.0,
             seed: int = 0, eos_token_id: Optional[int] = None) -> Generation:
    """Continue `prompt_ids`.

    Args:
        model: RetroForCausalLM (eval mode is set here).
        tokenizer: decodes chunks for `retrieve` and the output text.
        prompt_ids: the prompt's token ids.
        max_new_tokens: generation budget.
        stop_sequences: strings that end generation; the text is cut before the first one.
        retrieve: callable(text of a completed chunk) -> its neighbour token ids, [k, r] (or
            [r] for one neighbour; None / empty = nothing found). None: no retrieval.
        gate: overrides `model.gate` for this call (0 = encoder bypass).
        top_k: None or 1 = greedy; else sample from the top k (with `temperature`, `seed`).
        eos_token_id: stops generation; default the tokenizer's.

    Returns:
        Generation(text, ids, stop_reason, retrieved_chunks, neighbours).
    """
    import torch

    eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    old_gate, was_training = model.gate, model.training
    if gate is not None:
        model.gate = gate
    model.eval()
    use_retrieval = retrieve is not None and model.encoder is not None and model.gate != 0
    ids = [int(t) for t in prompt_ids]
    new: list[int] = []
    per_chunk: list = []
    m = model.config.chunk_length
    reason = "max_new_tokens"
    try:
        with torch.inference_mode():
            cache = step_input = None
            if not use_retrieval:
                from transformers import DynamicCache

                cache = DynamicCache(config=model.decoder.config)
                step_input = ids
            for _ in range(max_new_tokens):
                if use_retrieval:
                    while len(per_chunk) < len(ids) // m:  # retrieve for newly completed chunks
                        j = len(per_chunk)
                        per_chunk.append(retrieve(tokenizer.decode(ids[j * m:(j + 1) * m])))
                    x = torch.tensor([ids], device=device)
                    nb = _neighbour_tensor(per_chunk).to(device) if per_chunk else None
                    logits = model(x, nb).logits[0, -1]
                else:
                    out = model.decoder(input_ids=torch.tensor([step_input], device=device),
                                        cache=cache, use_cache=True)
                    logits = out.logits[0, -1]
                token = _pick(logits, top_k, temperature, generator)
                ids.append(token)
                new.append(token)
                step_input = [token]
                if eos is not None and token == eos:
                    reason = "eos"
                    break
                text = tokenizer.decode(new, skip_special_tokens=True)
                if any(s in text for s in stop_sequences):
                    reason = "stop_sequence"
                    break
    finally:
        model.gate = old_gate
        model.train(was_training)
    text = tokenizer.decode(new, skip_special_tokens=True)
    for s in stop_sequences:
        if s in text:
            text = text[: text.index(s)]
    return Generation(text=text, ids=new, stop_reason=reason, retrieved_chunks=len(per_chunk),
                      neighbours=[None if x is None else
                                  torch.as_tensor(x).tolist() for x in per_chunk])
