"""LM-supervised retrieval (LSR) math: the target p_LSR, the retriever's p_R, and their KL.

For an example (x, y) and its top-k chunks c_1..c_k (REFERENCE §6, RA-DIT §2.4):

    p_LSR(c_i | x, y) = softmax_i( score_i / τ ),   score_i = log p_LM(y | c_i ∘ x)
    p_R(c_i | x)      = softmax_i( s(E_q(x), E_d(c_i)) / τ_R )
    loss              = KL(p_LSR ‖ p_R)  (or KL(p_R ‖ p_LSR) with kl="r_lsr")

Missing chunks (id -1, fewer hits than k) are masked out of both distributions. Shapes: b
examples, k chunks, d embedding dims.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def lm_scores(logprob_sum: np.ndarray, n_tokens: np.ndarray, kind: str) -> np.ndarray:
    """score(c) from log p_LM(y | c∘x) summed over y's tokens [b, k] and y's length [b, k].

    Args:
        kind: `logprob` (the sum), `mean_logprob` (per token) or `prob` (exp of the sum).
    """
    if kind == "logprob":
        return logprob_sum
    if kind == "mean_logprob":
        return logprob_sum / np.maximum(n_tokens, 1)
    if kind == "prob":
        return np.exp(logprob_sum)
    raise ValueError(f"unknown lm_score {kind!r}")


def lsr_target(scores: np.ndarray, tau: float, mask: np.ndarray | None = None) -> np.ndarray:
    """p_LSR = softmax(scores / τ) over the valid chunks of each row [b, k] (float64)."""
    z = np.asarray(scores, dtype=np.float64) / tau
    if mask is not None:
        z = np.where(mask, z, -np.inf)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def retriever_scores(q: Any, d: Any, metric: str = "ip") -> Any:
    """s(q, d) for queries q [b, dim] and their chunks d [b, k, dim] -> [b, k] (torch or numpy):
    the inner product, or minus the squared L2 distance (faiss's two metrics, higher = better)."""
    if metric == "ip":
        return (d * q[:, None, :]).sum(-1)
    if metric == "l2":
        return -((d - q[:, None, :]) ** 2).sum(-1)
    raise ValueError(f"unknown metric {metric!r}")


def retriever_log_probs(scores: Any, temperature: float, mask: Any) -> Any:
    """log p_R = log_softmax(scores / τ_R) over the valid chunks [b, k] (torch)."""
    import torch

    z = (scores / temperature).masked_fill(~mask, float("-inf"))
    return torch.log_softmax(z, dim=-1)


def kl_loss(target: Any, log_p_r: Any, mask: Any, order: str = "lsr_r") -> Any:
    """Mean over the batch of KL(p_LSR ‖ p_R) (`lsr_r`) or KL(p_R ‖ p_LSR) (`r_lsr`) (torch).

    Args:
        target: p_LSR [b, k] (no gradient).
        log_p_r: log p_R [b, k] (-inf on masked chunks).
        mask: valid chunks [b, k] bool.
        order: which KL.
    """
    import torch

    zero = torch.zeros_like(log_p_r)
    log_p = torch.where(mask, log_p_r, zero)          # finite everywhere: no NaN gradients
    log_t = torch.log(target.clamp_min(torch.finfo(target.dtype).tiny))
    if order == "lsr_r":
        terms = target * (log_t - log_p)
    elif order == "r_lsr":
        terms = log_p.exp() * (log_p - log_t)
    else:
        raise ValueError(f"unknown kl order {order!r}")
    return torch.where(mask, terms, zero).sum(-1).mean()   # masked chunks add nothing
