"""The reader side of a joint step: (chunk, x, y) rows and the LM's token log-probs on them.

Each example is rendered once per retrieved chunk exactly as RA-IT renders its training rows and
the QA evaluator's REPLUG prompt ("Background: <chunk>" before the instruction, the QA system
text, "The answer is" then y). Two masks per row: the loss tokens (the answer, its template and
the EOD after it, as RA-IT trains) and y's own tokens (what PDist / EMDR² score, as RA-DIT's
LSR does: radit/scoring.py `y_only`). One forward per example (its k rows as a batch) gives both;
the LM head runs only at the positions that predict a loss token, so the 49k-wide vocabulary
projection costs a few positions per row instead of all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from retro.components.devices import module_device
from retro.components.evaluators.prompts import cut_tokens, with_background
from retro.components.instruct.render import encode
from retro.components.radit.data import Example
from retro.components.radit.scoring import y_only


@dataclass
class Rows:
    """One example's k rows, right-padded with EOD to a common width."""

    tokens: np.ndarray
    """int64 [k, w]."""
    loss_mask: np.ndarray
    """uint8 [k, w]: tokens the reader loss predicts (answer template, y, EOD)."""
    y_mask: np.ndarray
    """uint8 [k, w]: y's own tokens (a subset of loss_mask), scored by the retriever losses."""
    truncated: int
    """Rows that exceeded `max_tokens` and lost the start of their prompt."""


def render_example(example: Example, chunks: Sequence[str], tokenizer: Any, eod: int,
                   max_tokens: int, system: str, max_chunk_tokens: int) -> Rows:
    """The k rows of `example`, one per chunk text."""

    tokenize = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    toks, loss, ys, cut = [], [], [], 0
    for text in chunks:
        turns = with_background(example.turns, cut_tokens(tokenizer, text, max_chunk_tokens))
        t, m, c = encode(turns, tokenize, eod, max_tokens, system)
        toks.append(t)
        loss.append(m)
        ys.append(y_only(t, m, example.target, tokenizer))
        cut += int(c)
    end = max(int(np.flatnonzero(m).max()) + 1 for m in loss)      # padding after it is unread
    return Rows(np.stack(toks)[:, :end].astype(np.int64), np.stack(loss)[:, :end],
                np.stack(ys)[:, :end], cut)


def token_logprobs(model: Any, rows: Rows) -> tuple[Any, Any, Any]:
    """log p_LM(token_t | tokens_<t) at every loss position, gathered per row.

    Args:
        model: a transformers causal LM (its `base_model` and output embeddings are used).
        rows: one example's rows.

    Returns:
        (log-probs [k, t] with gradient, loss mask [k, t] float, y mask [k, t] float), where t
        is the most loss tokens of any row; row i's loss tokens fill its first columns in
        order, so y's tokens line up across rows (the same answer after the same template).
    """
    import torch

    dev = module_device(model)                                  # where the LM computes
    x = torch.as_tensor(rows.tokens, device=dev)
    k, t = len(rows.tokens), int(rows.loss_mask[:, 1:].sum(1).max())
    pos = torch.zeros((k, t), dtype=torch.long, device=dev)     # positions that predict them
    lmask = torch.zeros((k, t), device=dev)
    ymask = torch.zeros((k, t), device=dev)
    for i in range(k):
        p = np.flatnonzero(rows.loss_mask[i, 1:]) + 1           # token 0 is never predicted
        pos[i, :len(p)] = torch.as_tensor(p - 1, device=dev)
        lmask[i, :len(p)] = 1
        ymask[i, :len(p)] = torch.as_tensor(rows.y_mask[i, p].astype(np.float32), device=dev)
    hidden = model.base_model(input_ids=x[:, :-1] if x.shape[1] > 1 else x).last_hidden_state
    h = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))      # [k, t, d]
    logits = model.get_output_embeddings()(h).float()
    targets = x.gather(1, (pos + 1).clamp_max(x.shape[1] - 1))
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
    return logp * lmask, lmask, ymask


def align_y(logp: Any, ymask: Any) -> tuple[Any, Any]:
    """y's token log-probs [k, n_y] and mask, y's tokens moved to the first columns of each row
    (the template before y may tokenise to a different length in no row: all rows share it, but
    a row cut by `max_tokens` can lose y's tail, which the mask then leaves out)."""
    import torch

    k = logp.shape[0]
    n = int(ymask.sum(1).max()) if k else 0
    out = logp.new_zeros((k, max(n, 1)))
    m = torch.zeros((k, max(n, 1)), device=logp.device)
    for i in range(k):
        idx = torch.nonzero(ymask[i] > 0, as_tuple=False)[:, 0]
        out[i, :len(idx)] = logp[i, idx]
        m[i, :len(idx)] = 1
    return out, m
