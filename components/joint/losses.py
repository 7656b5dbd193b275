"""The joint recipe's losses: the retriever's (PDist, EMDR²) and the reader's, from one LM pass.

Shapes: b examples, k retrieved chunks per example, t answer (y) tokens. The LM scores every
(chunk, x, y) row once per step (reader.py); the retriever losses read those scores detached
(no gradient into the LM, as Atlas computes them under `no_grad`), and the reader loss keeps the
gradient.

    p_R(c_i | x)   = softmax_i( s(E_q(x), E_d(c_i)) / τ_R )                 (retriever)

    PDist          target_i = softmax_i( score_i / τ ),  score_i = mean_t log p_LM(y_t | c_i∘x, y_<t)
                   loss = KL(target ‖ p_R)        Atlas `ppmean` (atlas.py:282-308, 552-555);
                   with score = Σ_t log p_LM (lm_score: logprob) this is RA-DIT's LSR target
                   against the *current* LM (radit/lsr.py, REFERENCE §6).

    EMDR² (token)  loss = -(1/t) Σ_t log Σ_i p_R(c_i | x) · p_LM(y_t | c_i∘x, y_<t)
                   Atlas's code (`logprob`, atlas.py:557-575): marginalised per answer token,
                   token log-probs from log_softmax(logits / T_gold) (`token_temperature`).
    EMDR² (seq.)   loss = -log Σ_i p_R(c_i | x) · p_LM(y | c_i∘x)   the EMDR² / REALM equation.

    reader replug  loss = -log Σ_i w_i · p_LM(y | c_i∘x),  w = p_R detached (REPLUG's ensemble;
                   RAG-sequence's marginal likelihood with the retriever held fixed)
    reader rows    loss = mean NLL over every answer token of every (c_i, x, y) row (RA-IT's loss)

Masked chunks (fewer than k hits) are out of every distribution. KL reduction: sum over the k
chunks, mean over the batch (Atlas's `KLDivLoss()` default also divides by k: a constant factor,
docs/fidelity.md).
"""

from __future__ import annotations

from typing import Any

from retro.components.radit.lsr import kl_loss, retriever_log_probs, retriever_scores

__all__ = ["emdr2_loss", "pdist_loss", "pdist_target", "reader_loss", "retriever_log_probs",
           "retriever_scores", "sequence_scores"]


def sequence_scores(token_logp: Any, token_mask: Any, kind: str = "mean_logprob") -> Any:
    """score_i per chunk [b, k] from y's token log-probs [b, k, t] and their mask [b, k, t]:
    the per-token mean (`mean_logprob`, Atlas ppmean) or the sum (`logprob`, RA-DIT)."""
    total = (token_logp * token_mask).sum(-1)
    if kind == "logprob":
        return total
    if kind == "mean_logprob":
        return total / token_mask.sum(-1).clamp_min(1)
    raise ValueError(f"unknown lm_score {kind!r}")


def pdist_target(scores: Any, tau: float, mask: Any) -> Any:
    """softmax(scores / τ) over the valid chunks [b, k] (no gradient)."""
    import torch

    z = (scores.detach().double() / tau).masked_fill(~mask, float("-inf"))
    return torch.softmax(z, dim=-1)


def pdist_loss(log_p_r: Any, scores: Any, mask: Any, tau: float, order: str = "lsr_r") -> Any:
    """KL(softmax(scores / τ) ‖ p_R), summed over chunks, mean over examples.

    Args:
        log_p_r: log p_R [b, k] (with gradient; -inf on masked chunks).
        scores: the LM's score of each chunk [b, k] (detached here).
        mask: valid chunks [b, k] bool.
        order: `lsr_r` (Atlas, the LSR implementations) or `r_lsr` (KL(p_R ‖ target)).
    """
    target = pdist_target(scores, tau, mask).to(log_p_r.dtype)
    return kl_loss(target, log_p_r, mask, order)


def emdr2_loss(log_p_r: Any, token_logp: Any, token_mask: Any, mask: Any,
               marginal: str = "token") -> Any:
    """EMDR²: minus the log of the retriever-weighted mixture of the LM's answer likelihoods.

    Args:
        log_p_r: log p_R [b, k] (with gradient).
        token_logp: log p_LM(y_t | c_i∘x, y_<t) [b, k, t] (detached here).
        token_mask: y's tokens [b, k, t] (the same tokens in every chunk's row).
        mask: valid chunks [b, k] bool.
        marginal: `token` (Atlas's code: mixture per token, mean over y's tokens of the batch)
            or `sequence` (the paper's equation: mixture of whole-answer likelihoods, mean over
            examples).
    """
    import torch

    lp = token_logp.detach().to(log_p_r.dtype)
    lp_r = torch.where(mask, log_p_r, torch.full_like(log_p_r, float("-inf")))
    if marginal == "token":
        m = token_mask[:, 0, :].to(lp.dtype)                         # [b, t]: y's tokens
        mix = torch.logsumexp(lp_r[..., None] + lp, dim=1)           # [b, t]
        return -(mix.masked_fill(m == 0, 0.0) * m).sum() / m.sum().clamp_min(1)
    if marginal == "sequence":
        seq = (lp * token_mask).sum(-1)                              # [b, k]
        return -torch.logsumexp(lp_r + seq, dim=1).mean()
    raise ValueError(f"unknown emdr2 marginal {marginal!r}")


def reader_loss(token_logp: Any, token_mask: Any, mask: Any, kind: str = "replug",
                log_p_r: Any = None) -> Any:
    """The LM's loss on its retrieval-augmented rows (gradient into the LM only).

    Args:
        token_logp: log p_LM of each loss token [b, k, t] (with gradient).
        token_mask: the loss tokens [b, k, t] (the answer and its EOD).
        mask: valid chunks [b, k] bool.
        kind: `replug` (-log Σ_i w_i p_LM(y | c_i∘x), w = p_R detached; uniform without
            `log_p_r`) or `rows` (mean token NLL over every row).
        log_p_r: log p_R [b, k], the ensemble weights (detached here).
    """
    import torch

    m = token_mask.to(token_logp.dtype)
    if kind == "rows":
        rows = mask[..., None].to(m.dtype) * m
        return -(token_logp * rows).sum() / rows.sum().clamp_min(1)
    if kind == "replug":
        if log_p_r is None:
            w = torch.log(mask.to(token_logp.dtype) / mask.sum(-1, keepdim=True).clamp_min(1))
        else:
            w = log_p_r.detach().to(token_logp.dtype)
        w = w.masked_fill(~mask, float("-inf"))
        seq = (token_logp * m).sum(-1)                                # [b, k]
        return -torch.logsumexp(w + seq, dim=1).mean()
    raise ValueError(f"unknown reader loss {kind!r}")
