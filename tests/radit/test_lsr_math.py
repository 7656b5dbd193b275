"""LSR and REPLUG math on hand-made numbers: p_LSR against its formula, p_R, the KL direction,
masking, and the REPLUG mixture step and weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retro.components.radit.lsr import (kl_loss, lm_scores, lsr_target, retriever_log_probs,
                                        retriever_scores)
from retro.components.evaluators.replug import mixture_step, retriever_weights


def test_p_lsr_formula_as_the_paper_writes_it_and_our_log_reading():
    """RA-DIT §2.4 (REFERENCE §6) writes p_LSR(c) ∝ exp(p_LM(y | c∘x) / τ): a probability over
    τ. `lm_score: prob` is that formula; the default `logprob` puts log p_LM over τ instead, a
    choice of ours (docs/fidelity.md), so τ = 0.01 means something else under each."""
    # log p_LM(y | c_i ∘ x) for three chunks: the first makes y most likely
    logp = np.array([[-1.0, -2.0, -4.0]])
    n = np.array([[3, 3, 3]])
    # the paper's formula, by hand: exp(p / τ) with p = e^-1, e^-2, e^-4 and τ = 0.01
    p = np.exp(logp[0])
    paper = np.exp(p / 0.01) / np.exp(p / 0.01).sum()
    np.testing.assert_allclose(lsr_target(lm_scores(logp, n, "prob"), 0.01)[0], paper,
                               rtol=1e-9)
    # our reading: exp(log p / τ), i.e. p^(1/τ)
    tau = 0.5
    expect = np.exp([-2.0, -4.0, -8.0])
    expect /= expect.sum()
    got = lsr_target(lm_scores(logp, n, "logprob"), tau)
    np.testing.assert_allclose(got[0], expect, rtol=1e-12)
    assert got[0, 0] == pytest.approx(1 / (1 + math.exp(-2) + math.exp(-6)))
    # τ = 0.01 under the log reading is nearly one-hot
    sharp = lsr_target(logp, 0.01)
    assert sharp[0, 0] == 1.0 and sharp[0, 1] == pytest.approx(math.exp(-100), rel=1e-9)
    # for a longer answer (p_LM ~ 1e-5) the paper's formula is nearly uniform at τ = 0.01,
    # the log reading still one-hot: the two are different targets, not one τ
    long = np.array([[-10.0, -11.0, -12.0]])
    flat = lsr_target(lm_scores(long, n, "prob"), 0.01)[0]
    assert flat.max() - flat.min() < 0.01
    assert lsr_target(lm_scores(long, n, "logprob"), 0.01)[0, 0] > 0.999
    # a higher τ flattens it
    assert lsr_target(logp, 1000.0)[0].std() < 1e-3


def test_p_lsr_score_variants_and_mask():
    logp = np.array([[-2.0, -6.0, -3.0]])
    n = np.array([[2, 4, 1]])
    np.testing.assert_allclose(lm_scores(logp, n, "mean_logprob"), [[-1.0, -1.5, -3.0]])
    np.testing.assert_allclose(lm_scores(logp, n, "prob"), np.exp(logp))
    # a missing chunk (id -1) gets no probability; the rest renormalise
    masked = lsr_target(logp, 1.0, mask=np.array([[True, False, True]]))
    e = np.exp([-2.0, -3.0])
    np.testing.assert_allclose(masked[0], [e[0] / e.sum(), 0.0, e[1] / e.sum()])


def test_p_r_and_kl_direction():
    q = torch.tensor([[1.0, 0.0]])
    d = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])
    s = retriever_scores(q, d, "ip")
    torch.testing.assert_close(s, torch.tensor([[1.0, 0.0, 0.6]]))
    torch.testing.assert_close(retriever_scores(q, d, "l2"), torch.tensor([[0.0, -2.0, -0.8]]))
    mask = torch.ones(1, 3, dtype=torch.bool)
    log_p_r = retriever_log_probs(s, 0.5, mask)
    p_r = np.exp(np.array([2.0, 0.0, 1.2]))
    p_r /= p_r.sum()
    np.testing.assert_allclose(log_p_r.exp()[0].numpy(), p_r, rtol=1e-6)
    target = np.array([0.7, 0.1, 0.2])
    forward = float(np.sum(target * np.log(target / p_r)))      # KL(p_LSR ‖ p_R)
    reverse = float(np.sum(p_r * np.log(p_r / target)))        # KL(p_R ‖ p_LSR)
    t = torch.tensor(target[None], dtype=torch.float32)
    assert float(kl_loss(t, log_p_r, mask, "lsr_r")) == pytest.approx(forward, rel=1e-5)
    assert float(kl_loss(t, log_p_r, mask, "r_lsr")) == pytest.approx(reverse, rel=1e-5)
    assert abs(forward - reverse) > 1e-3                          # the order matters here
    # KL is zero exactly when p_R equals the target
    same = torch.log(torch.tensor(p_r[None], dtype=torch.float32))
    assert float(kl_loss(torch.tensor(p_r[None], dtype=torch.float32), same, mask)) < 1e-6


def test_kl_masks_missing_chunks_without_nan_gradients():
    s = torch.tensor([[2.0, 1.0, 0.5]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    target = torch.tensor([[1.0, 0.0, 0.0]])                     # one-hot (τ -> 0)
    for order in ("lsr_r", "r_lsr"):
        loss = kl_loss(target, retriever_log_probs(s, 0.1, mask), mask, order)
        s.grad = None
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
        assert s.grad[0, 2] == 0                                  # the missing chunk
        assert s.grad[0, 0] < 0                                   # raise the target's score
    # forward order with a one-hot target is the cross-entropy of the target chunk
    lp = retriever_log_probs(s.detach(), 0.1, mask)
    assert float(kl_loss(target, lp, mask)) == pytest.approx(float(-lp[0, 0]), rel=1e-6)


def test_replug_weights_and_mixture_step():
    w = retriever_weights([0.9, 0.7, 0.1], 0.1)                 # inner products, best first
    e = np.exp(np.array([9.0, 7.0, 1.0]) - 9.0)
    np.testing.assert_allclose(w, e / e.sum())
    # faiss L2 distances grow along the ranking: the closest passage still weighs most
    d = retriever_weights([0.2, 0.4, 1.5], 0.1)
    assert d[0] > d[1] > d[2] and d.sum() == pytest.approx(1.0)
    # one step: p(t) = Σ_c w_c p_c(t)
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=torch.float64)
    prior = torch.tensor([0.25, 0.75], dtype=torch.float64)
    mix = mixture_step(torch.log(prior), torch.log(p)).exp()
    torch.testing.assert_close(mix, prior @ p)
    # unnormalised log posteriors give the same distribution
    torch.testing.assert_close(mixture_step(torch.log(prior) + 3.0, torch.log(p)).exp(), mix)


def test_lsr_scores_y_only_so_template_noise_cannot_flip_the_target(shared_data):
    """RA-DIT's p_LM(y | c∘x) (REFERENCE §6) scores y, not the answer template "The answer is"
    nor the EOD (issue 13 defect 7). Constructed case: with chunk A the LM is unsure of the
    template (p = 0.5 per token) but sure of y (0.9); with chunk B the reverse (0.99, 0.6).
    y alone prefers A; template + y + EOD would prefer B."""
    from transformers import GPT2TokenizerFast

    from retro.components.evaluators.prompts import ANSWER_PREFIX, SHORT_SPAN
    from retro.components.radit.data import Example
    from retro.components.radit.scoring import answer_logprobs, render_rows

    tok = GPT2TokenizerFast.from_pretrained(str(shared_data / "tokenizer_gpt2"))
    eod = tok.eos_token_id
    ex = Example(query="capital of France?", where="t:1", target="Paris",
                 turns=((SHORT_SPAN + "capital of France?", f"{ANSWER_PREFIX} Paris"),))
    tokens, mask, _ = render_rows([ex], [["alpha", "beta"]], tok, eod, 96, "System: s", 16)
    y = set(tok.encode(" Paris"))
    marker = tok.encode(" alpha")[0]
    scored = [tok.decode(tokens[r][mask[r] == 1]) for r in range(2)]
    assert scored == [" Paris", " Paris"]                    # y's tokens, nothing else

    class FakeLM:
        """Gives the row's true next token probability q: by chunk and by token kind."""

        def eval(self):
            return self

        def __call__(self, x):
            b, w = x.shape
            logits = torch.zeros(b, w, 50257, dtype=torch.float64)
            for i in range(b):
                row = next(r for r in tokens if (r[:w] == x[i].numpy()).all())
                a = marker in row.tolist()
                for t in range(w):
                    nxt = int(row[t + 1])
                    q = (0.9 if a else 0.6) if nxt in y else (0.5 if a else 0.99)
                    logits[i, t] = math.log((1 - q) / 50256)
                    logits[i, t, nxt] = math.log(q)
            return type("Out", (), {"logits": logits})()

    logp, n = answer_logprobs(FakeLM(), tokens, mask, batch_size=2)
    np.testing.assert_allclose(logp, [math.log(0.9), math.log(0.6)], rtol=5e-3)  # fp32 logits
    assert list(n) == [1, 1]
    target = lsr_target(lm_scores(logp[None], n[None], "logprob"), 0.01)[0]
    assert target.argmax() == 0                               # chunk A
    # RA-IT's loss mask (template + y + EOD), which LSR used before, picks B
    from retro.components.instruct.render import encode
    from retro.components.evaluators.prompts import with_background

    tokenize = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    old_mask = np.stack([encode(with_background(ex.turns, c), tokenize, eod, 96, "System: s")[1]
                         for c in ("alpha", "beta")])
    old, _ = answer_logprobs(FakeLM(), tokens, old_mask, batch_size=2)
    assert lsr_target(old[None], 0.01)[0].argmax() == 1
