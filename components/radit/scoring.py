"""LM scoring for LSR: log p_LM(y | c ∘ x) for every (example, retrieved chunk) pair.

Rows are rendered exactly as RA-IT renders its training rows (`instruct.render.encode` with the
chunk as "Background: ..." before the instruction), but only y's own tokens are scored: RA-DIT's
p_LM(y | c∘x) (REFERENCE §6), not the answer template before y ("The answer is") nor the EOD
after it, which RA-IT's loss also covers. Template tokens are near-certain for some chunks and
not others, and with τ = 0.01 their noise would decide p_LSR. Computed once, before the query
encoder trains, as the paper does (its LSR scores are not refreshed).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from retro.components.devices import module_device
from retro.components.radit.data import Example
from retro.components.evaluators.prompts import cut_tokens, with_background
from retro.components.instruct.render import encode


def render_rows(examples: Sequence[Example], chunks: Sequence[Sequence[str]], tokenizer: Any,
                eod: int, seq_length: int, system: str, max_chunk_tokens: int
                ) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows [n * k, seq_length + 1] (tokens int32, answer-loss mask uint8) for each example
    with each of its chunks, in example-major order; also the count of truncated rows."""

    tokenize = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    toks, masks, cut = [], [], 0
    for ex, texts in zip(examples, chunks):
        for text in texts:
            turns = with_background(ex.turns, cut_tokens(tokenizer, text, max_chunk_tokens))
            t, m, c = encode(turns, tokenize, eod, seq_length, system)
            m = y_only(t, m, ex.target, tokenizer)
            toks.append(t)
            masks.append(m)
            cut += int(c)
    return np.stack(toks), np.stack(masks), cut


def y_only(tokens: np.ndarray, mask: np.ndarray, target: str, tokenizer: Any) -> np.ndarray:
    """The answer mask of an `encode`d row narrowed to y's tokens: without the EOD after the
    answer and, when `target` is given, without the template tokens before it (the longest
    answer suffix that decodes to `target`; the whole answer if none does)."""
    pos = np.flatnonzero(mask)
    out = np.zeros_like(mask)
    if len(pos) < 2:
        return out
    answer = pos[:-1]                                # the last scored position is the EOD
    start = 0
    if target:
        ids = tokens[answer].tolist()
        start = next((s for s in range(len(ids) - 1, -1, -1)
                      if tokenizer.decode(ids[s:]).strip() == target.strip()), 0)
    out[answer[start:]] = 1
    return out


def answer_logprobs(model: Any, tokens: np.ndarray, mask: np.ndarray, batch_size: int,
                    progress: Callable[[int], None] | None = None) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """Sum of log p(token t | tokens < t) over the positions with mask[t] = 1, per row.

    Args:
        model: a causal LM whose call returns `.logits` [b, n, V].
        tokens, mask: rows [N, W] from `render_rows` (right-padded, so no attention mask).
        batch_size: rows per forward.
        progress: called with the number of rows done after each batch.

    Returns:
        (logprob sum [N] float64, scored tokens [N] int).
    """
    import torch

    out = np.zeros(len(tokens), dtype=np.float64)
    count = mask[:, 1:].sum(axis=1).astype(np.int64)
    # last scored position + 1 per row: padding after it is never read
    ends = np.array([np.flatnonzero(m).max() + 1 if m.any() else 1 for m in mask])
    order = np.argsort(-ends, kind="stable")                 # similar lengths share a batch
    model.eval()
    device = module_device(model)                   # the stage's device (load_eval_lm)
    with torch.inference_mode():
        for a in range(0, len(order), batch_size):
            rows = order[a:a + batch_size]
            w = int(ends[rows].max())
            x = torch.as_tensor(tokens[rows, :w], dtype=torch.long, device=device)
            m = torch.as_tensor(mask[rows, 1:w], dtype=torch.float64)
            logits = model(x[:, :-1]).logits.float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, x[:, 1:, None])[..., 0]
            out[rows] = (logp.double().cpu() * m).sum(-1).numpy()
            if progress:
                progress(len(rows))
    return out, count
