"""Greedy / top-k generation, with retrieval per completed chunk or without (gate 0).

`generate_batch` decodes many prompts at once, left-padded, through `CachedRetro`
(incremental.py): decoder keys/values are cached, and with retrieval every chunk of m real
tokens that completes (prompt chunks included) is retrieved once (`retrieve(chunk_text)`),
encoded once and cached as cross-attention keys/values; its neighbours reach the chunk's last
token and the m-1 tokens after it (RETRO's shift). Rows stop independently (stop sequence, EOS,
budget). `generate` is one prompt; `use_cache=False` re-runs the full forward over the whole
sequence at every step (the reference the cached path is tested against, and the bench's
baseline).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from retro.components.devices import module_device


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
    # on CPU: the seeded CPU generator then samples the same tokens whatever the model's device
    values, indices = torch.topk(logits.float().cpu() / max(temperature, 1e-6), top_k)
    probs = torch.softmax(values, dim=-1)
    return int(indices[torch.multinomial(probs, 1, generator=generator)])


def pad_id(tokenizer) -> int:
    """A token id for padding columns (never attended; any valid id works)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def generate_batch(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                   stop_sequences: Sequence[str] = (), retrieve=None,
                   gate: Optional[float] = None, top_k: Optional[int] = None,
                   temperature: float = 1.0, seed: int = 0,
                   eos_token_id: Optional[int] = None) -> list[Generation]:
    """Continue every prompt in one left-padded batch with KV caches.

    Args are those of `generate`, except: `prompts` is a list of token-id prompts, and
    `retrieve` is None, one callable for every row, or a list with one callable (or None) per
    row. Row i samples with its own generator seeded `seed`, so each row gives exactly what
    `generate` gives for it alone (greedy: token for token; tested).

    Returns:
        One Generation per prompt, in order.
    """
    import torch

    from retro.components.models.retro.incremental import CachedRetro

    b = len(prompts)
    if b == 0:
        return []
    if retrieve is None or callable(retrieve):
        retrieve = [retrieve] * b
    if len(retrieve) != b:
        raise ValueError(f"{len(retrieve)} retrieve functions for {b} prompts")
    eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    generators = [torch.Generator().manual_seed(seed) for _ in range(b)]
    old_gate, was_training = model.gate, model.training
    if gate is not None:
        model.gate = gate
    model.eval()
    new: list[list[int]] = [[] for _ in range(b)]
    reason = ["max_new_tokens"] * b
    active = [True] * b
    pad = pad_id(tokenizer)
    try:
        with torch.inference_mode():
            state, logits = CachedRetro.prefill(model, prompts, tokenizer, retrieve)
            for t in range(max_new_tokens):
                step = torch.full((b, 1), pad, dtype=torch.long)
                for r in range(b):
                    if not active[r]:
                        continue
                    token = _pick(logits[r], top_k, temperature, generators[r])
                    new[r].append(token)
                    step[r, 0] = token
                    if eos is not None and token == eos:
                        reason[r], active[r] = "eos", False
                    elif any(s in tokenizer.decode(new[r], skip_special_tokens=True)
                             for s in stop_sequences):
                        reason[r], active[r] = "stop_sequence", False
                if not any(active) or t == max_new_tokens - 1:
                    break  # the last token is never fed: nothing retrieves for it
                logits = state.step(step, torch.tensor(active)[:, None])
    finally:
        model.gate = old_gate
        model.train(was_training)
    out = []
    for r in range(b):
        text = tokenizer.decode(new[r], skip_special_tokens=True)
        for s in stop_sequences:
            if s in text:
                text = text[: text.index(s)]
        nbrs = state.neighbours[r]
        out.append(Generation(text=text, ids=new[r], stop_reason=reason[r],
                              retrieved_chunks=len(nbrs),
                              neighbours=[_as_lists(x) for x in nbrs]))
    return out


def _as_lists(found):
    """A `retrieve` result as plain lists (ragged neighbours stay ragged)."""
    import torch

    if found is None:
        return None
    try:
        return torch.as_tensor(found).tolist()
    except (ValueError, TypeError):
        return [torch.as_tensor(x).tolist() for x in found]


def _neighbour_tensor(per_chunk: list, pad: int = -1):
    """list (per chunk) of `retrieve` results -> LongTensor [1, L, k_max, r_max], -1 padded."""
    import torch

    from retro.components.models.retro.incremental import neighbour_block

    rows = [neighbour_block(x) for x in per_chunk]
    k = max(t.shape[0] for t in rows)
    r = max(t.shape[1] for t in rows)
    out = torch.full((1, len(rows), k, r), pad, dtype=torch.long)
    for j, t in enumerate(rows):
        out[0, j, : t.shape[0], : t.shape[1]] = t
    return out


def generate(model, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int = 64,
             stop_sequences: Sequence[str] = (), retrieve: Optional[Callable] = None,
             gate: Optional[float] = None, top_k: Optional[int] = None, temperature: float = 1.0,
             seed: int = 0, eos_token_id: Optional[int] = None,
             use_cache: bool = True) -> Generation:
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
        use_cache: False re-runs the full forward over the sequence at every step (slow; the
            reference for the cached path).

    Returns:
        Generation(text, ids, stop_reason, retrieved_chunks, neighbours).
    """
    import torch

    if use_cache:
        return generate_batch(model, tokenizer, [prompt_ids], max_new_tokens, stop_sequences,
                              retrieve=[retrieve], gate=gate, top_k=top_k,
                              temperature=temperature, seed=seed, eos_token_id=eos_token_id)[0]

    eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    generator = torch.Generator().manual_seed(seed)
    device = module_device(model)
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
            for _ in range(max_new_tokens):
                while use_retrieval and len(per_chunk) < len(ids) // m:  # newly completed
                    j = len(per_chunk)
                    per_chunk.append(retrieve(tokenizer.decode(ids[j * m:(j + 1) * m])))
                x = torch.tensor([ids], device=device)
                nb = _neighbour_tensor(per_chunk).to(device) if per_chunk else None
                logits = model(x, nb).logits[0, -1]
                token = _pick(logits, top_k, temperature, generator)
                ids.append(token)
                new.append(token)
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
                      neighbours=[_as_lists(x) for x in per_chunk])
