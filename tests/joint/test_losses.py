"""The joint recipe's losses against hand-computed cases.

Formulas: Atlas (REFERENCE_FAMILIES §D: PDist = KL(softmax(mean token log-prob / T_gold) ‖ p_R),
EMDR² code = -mean_t log Σ_k p_R(d_k) p_LM(y_t | d_k)) and RA-DIT's LSR (REFERENCE §6: the same
KL with the summed log-likelihood). Numbers below are worked by hand in the comments.
"""

import math

import pytest
import torch

from retro.components.joint.losses import (emdr2_loss, pdist_loss, reader_loss,
                                           retriever_log_probs, sequence_scores)

# Two chunks A, B for one example; y has two tokens.
# p_LM(y_t | A) = (0.5, 0.2), p_LM(y_t | B) = (0.1, 0.4)  -> p(y | A) = 0.1, p(y | B) = 0.04
# p_R = (0.25, 0.75): retriever logits (0, ln 3) at temperature 1.
TOKEN_P = [[0.5, 0.2], [0.1, 0.4]]
P_R = (0.25, 0.75)


def _case(extra_masked_chunk: bool = False):
    p = [row[:] for row in TOKEN_P] + ([[0.9, 0.9]] if extra_masked_chunk else [])
    token_logp = torch.log(torch.tensor([p], dtype=torch.float64))           # [1, k, 2]
    token_mask = torch.ones_like(token_logp)
    logits = [0.0, math.log(3.0)] + ([5.0] if extra_masked_chunk else [])
    scores = torch.tensor([logits], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True] + ([False] if extra_masked_chunk else [])])
    return token_logp, token_mask, scores, mask


def test_retriever_distribution_is_the_softmax_of_scores_over_temperature():
    _, _, scores, mask = _case()
    p = retriever_log_probs(scores, 1.0, mask).exp()
    assert p.tolist()[0] == pytest.approx(list(P_R))


@pytest.mark.parametrize("masked", [False, True])
def test_emdr2_token_marginal_matches_hand_computation(masked):
    # per token: t1 0.25*0.5 + 0.75*0.1 = 0.2 ; t2 0.25*0.2 + 0.75*0.4 = 0.35
    token_logp, token_mask, scores, mask = _case(masked)
    loss = emdr2_loss(retriever_log_probs(scores, 1.0, mask), token_logp, token_mask, mask,
                      "token")
    assert loss.item() == pytest.approx(-(math.log(0.2) + math.log(0.35)) / 2)


@pytest.mark.parametrize("masked", [False, True])
def test_emdr2_sequence_marginal_and_its_gradient_is_prior_minus_posterior(masked):
    # p(y) = 0.25*0.1 + 0.75*0.04 = 0.055; posterior = (0.025, 0.03) / 0.055
    token_logp, token_mask, scores, mask = _case(masked)
    loss = emdr2_loss(retriever_log_probs(scores, 1.0, mask), token_logp, token_mask, mask,
                      "sequence")
    assert loss.item() == pytest.approx(-math.log(0.055))
    loss.backward()
    post = (0.025 / 0.055, 0.03 / 0.055)
    # REALM / EMDR²: d(-log Σ p_R p_LM) / d(retriever logit_i) = p_R(i) - posterior(i)
    assert scores.grad[0, :2].tolist() == pytest.approx([P_R[0] - post[0], P_R[1] - post[1]])
    if masked:
        assert float(scores.grad[0, 2]) == 0.0


@pytest.mark.parametrize("masked", [False, True])
def test_pdist_is_kl_of_softmax_of_mean_token_logprob(masked):
    # Atlas ppmean: score = mean_t log p: A (ln .5 + ln .2)/2 = ln(0.1)/2, B ln(0.04)/2.
    # target at T_gold = 1: softmax -> sqrt(0.1), sqrt(0.04)=0.2 normalised.
    token_logp, token_mask, scores, mask = _case(masked)
    lm = sequence_scores(token_logp, token_mask, "mean_logprob")
    assert lm[0, :2].tolist() == pytest.approx([math.log(0.1) / 2, math.log(0.04) / 2])
    a, b = math.sqrt(0.1), 0.2
    target = (a / (a + b), b / (a + b))
    want = sum(t * math.log(t / p) for t, p in zip(target, P_R))
    loss = pdist_loss(retriever_log_probs(scores, 1.0, mask), lm, mask, tau=1.0)
    assert loss.item() == pytest.approx(want)
    loss.backward()
    # d KL(target ‖ softmax(z)) / dz_i = p_R(i) - target(i)
    assert scores.grad[0, :2].tolist() == pytest.approx([P_R[0] - target[0],
                                                         P_R[1] - target[1]])


def test_pdist_with_summed_logprob_and_small_tau_is_radit_lsr():
    # RA-DIT LSR: target = softmax(log p(y|c) / τ); log p = (ln .1, ln .04), τ = 0.5:
    # exp(2 ln .1) = 0.01, exp(2 ln .04) = 0.0016  -> target (0.01, 0.0016) / 0.0116
    token_logp, token_mask, scores, mask = _case()
    lm = sequence_scores(token_logp, token_mask, "logprob")
    target = (0.01 / 0.0116, 0.0016 / 0.0116)
    want = sum(t * math.log(t / p) for t, p in zip(target, P_R))
    loss = pdist_loss(retriever_log_probs(scores, 1.0, mask), lm, mask, tau=0.5)
    assert loss.item() == pytest.approx(want)


def test_retriever_losses_send_no_gradient_into_the_lm():
    token_logp, token_mask, scores, mask = _case()
    token_logp.requires_grad_(True)
    log_p_r = retriever_log_probs(scores, 1.0, mask)
    lm = sequence_scores(token_logp, token_mask, "mean_logprob")
    (pdist_loss(log_p_r, lm, mask, 1.0)
     + emdr2_loss(log_p_r, token_logp, token_mask, mask)).backward()
    assert token_logp.grad is None or float(token_logp.grad.abs().sum()) == 0.0
    assert float(scores.grad.abs().sum()) > 0


def test_reader_replug_is_the_mixture_likelihood_and_trains_only_the_lm():
    token_logp, token_mask, scores, mask = _case()
    token_logp.requires_grad_(True)
    loss = reader_loss(token_logp, token_mask, mask, "replug",
                       retriever_log_probs(scores, 1.0, mask))
    assert loss.item() == pytest.approx(-math.log(0.055))
    loss.backward()
    assert scores.grad is None
    # d(-log Σ w_i Π_t p_it) / d log p_it = -posterior_i
    post = (0.025 / 0.055, 0.03 / 0.055)
    assert token_logp.grad[0, :, 0].tolist() == pytest.approx([-post[0], -post[1]])


def test_reader_rows_is_the_mean_token_nll_of_every_row():
    token_logp, token_mask, _, mask = _case(extra_masked_chunk=True)
    want = -(math.log(0.5) + math.log(0.2) + math.log(0.1) + math.log(0.4)) / 4
    assert reader_loss(token_logp, token_mask, mask, "rows").item() == pytest.approx(want)
