"""Parallel in-context retrieval augmentation (REPLUG; RA-DIT's inference, REFERENCE §6).

Each of the top-k passages is put alone before the question ("Background: ..."), giving k
prompts; the answer's probability is the mixture

    p(y | x) = Σ_c p_R(c | x) · p_LM(y | c ∘ x),   p_R = softmax(retriever score / T) over top-k

Greedy decoding of that mixture, token by token: with w_c(t) ∝ p_R(c|x) · p_LM(y_<t | c∘x)
(the posterior of chunk c given the answer so far), p(y_t | y_<t, x) = Σ_c w_c(t) ·
p_LM(y_t | c∘x, y_<t), whose argmax is appended to all k prompts. The product of these steps is
exactly the mixture above. The k prompts decode as one left-padded batch with a KV cache.

`answer_replug` is what the `qa` evaluator's `eval-qa` calls when its `replug` field is on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from retro.components.evaluators.prompts import (ANSWER_PREFIX, BACKGROUND, SHORT_SPAN, SYSTEM,
                                                 cut_tokens)
from retro.platform.errors import UserError
from retro.components.evaluators.metrics import answer_in_text, qa_scores
from retro.components.evaluators.prompts import STOP_SEQUENCES, clean_answer
from retro.components.evaluators.qa import passage_id


@dataclass
class MixtureGeneration:
    text: str
    """Decoded answer, cut before the first stop sequence."""
    ids: list[int]
    """Generated token ids."""
    prior: list[float]
    """p_R(c | x) of each prompt's passage."""
    posterior: list[float]
    """p(c | x, y) after the answer: which passages the answer came from."""
    logprob: float
    """log p(y | x) of the generated tokens under the mixture."""


def retriever_weights(scores: Sequence[float], temperature: float) -> np.ndarray:
    """p_R over the top-k passages: softmax of their scores / temperature.

    Passages come best first, so scores that increase along the ranking are distances (faiss
    L2) and are negated; inner products and BM25 scores decrease.
    """
    s = np.asarray(scores, dtype=np.float64)
    if len(s) > 1 and s[0] < s[-1]:
        s = -s
    z = s / temperature
    z = z - z.max()
    w = np.exp(z)
    return w / w.sum()


def mixture_step(log_post: Any, log_p: Any) -> Any:
    """log p(next token | answer so far, x) [V] from the chunks' log posteriors [k] (unnormalised)
    and their next-token log-probabilities [k, V] (torch, float64)."""
    import torch

    return torch.logsumexp(log_post[:, None] + log_p, dim=0) - torch.logsumexp(log_post, dim=0)


def replug_generate(decoder: Any, tokenizer: Any, prompts: Sequence[Sequence[int]],
                    prior: np.ndarray, max_new_tokens: int, stop_sequences: Sequence[str] = (),
                    eos_token_id: int | None = None) -> MixtureGeneration:
    """Greedy decoding of the REPLUG mixture over `prompts` weighted by `prior`.

    The k prompts run as one left-padded batch with a shared KV cache (CachedRetro); each new
    token is appended to every row.

    Args:
        decoder: a transformers causal LM, or a RetroForCausalLM (its decoder alone runs).
        tokenizer: decodes the answer.
        prompts: one token-id prompt per passage.
        prior: p_R of each prompt [k] (sums to 1).
        max_new_tokens: generation budget.
        stop_sequences: strings that end the answer (not included).
        eos_token_id: ends generation; default the tokenizer's.
    """
    import torch

    from retro.components.models.retro.incremental import CachedRetro, as_retro

    eos = eos_token_id if eos_token_id is not None else tokenizer.eos_token_id
    model = as_retro(decoder)
    was_training = model.training
    model.eval()
    log_post = torch.log(torch.as_tensor(np.asarray(prior), dtype=torch.float64))
    new: list[int] = []
    total = 0.0
    k = len(prompts)
    try:
        with torch.inference_mode():
            state, logits = CachedRetro.prefill(model, prompts)  # the decoder alone
            for t in range(max_new_tokens):
                log_p = torch.log_softmax(logits.double().cpu(), dim=-1)   # [k, V]
                mix = mixture_step(log_post, log_p)
                token = int(mix.argmax())
                total += float(mix[token])
                log_post = log_post + log_p[:, token]
                new.append(token)
                if eos is not None and token == eos:
                    break
                if any(s in tokenizer.decode(new, skip_special_tokens=True)
                       for s in stop_sequences):
                    break
                if t + 1 < max_new_tokens:
                    logits = state.step(torch.full((k, 1), token, dtype=torch.long))
    finally:
        model.train(was_training)
    text = tokenizer.decode(new, skip_special_tokens=True)
    for s in stop_sequences:
        if s in text:
            text = text[: text.index(s)]
    post = torch.softmax(log_post, dim=0).tolist()
    return MixtureGeneration(text, new, list(map(float, prior)), post, total)


def passage_prompt(fmt: str, question: str, passage: str, tokenizer: Any,
                   max_prompt_tokens: int, answer_tokens: int) -> list[int]:
    """Token ids of the QA prompt with one passage as background (RA-IT's layout).

    `instructretro`: "System: <QA system>\\n\\nUser: Background: <passage>\\n\\n<short-span
    instruction> <question>\\n\\nAssistant: The answer is"; `chat`: the same system and user
    text through the tokenizer's chat template. The passage is cut to fit the budget.
    """
    def build(text: str) -> list[int]:
        user = BACKGROUND.format(text=text.strip()) + SHORT_SPAN + question.strip()
        if fmt == "chat":
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
            s = tokenizer.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=True) + ANSWER_PREFIX
        else:
            s = f"System: {SYSTEM}\n\nUser: {user}\n\nAssistant: {ANSWER_PREFIX}"
        return list(tokenizer.encode(s, add_special_tokens=False))

    ids = build(passage)
    over = len(ids) + answer_tokens - max_prompt_tokens
    if over > 0:
        n = len(tokenizer.encode(passage, add_special_tokens=False))
        ids = build(cut_tokens(tokenizer, passage, max(n - over, 0)))
    return ids


def answer_replug(lm: Any, cfg: Any, row: dict[str, Any]) -> dict[str, Any]:
    """One QA answer by REPLUG over the row's top `cfg.passages` passages; the record has the
    fields of `qa.answer_one` plus the passages' prior and posterior weights.

    Raises:
        UserError: a Retro model with its encoder on (REPLUG runs the decoder alone), or a row
            without passages.
    """

    if lm.is_retro and cfg.encoder:
        raise UserError("qa.replug decodes with the decoder alone: set `encoder: false` for a "
                        "Retro model")
    # a reading-comprehension row answers from its own paragraph alone (prior 1)
    passages = [row["context"]] if row.get("context") else row["passages"][:cfg.passages]
    if not passages:
        raise UserError(f"qa.replug: question {row['id']} has no retrieved passage; REPLUG "
                        "needs `passages` >= 1 and a qa-retrieve input")
    texts = [p["text"] for p in passages]
    prompts = [passage_prompt(cfg.prompt, row["question"], t, lm.tokenizer,
                              cfg.max_prompt_tokens, cfg.max_new_tokens) for t in texts]
    prior = np.ones(1) if row.get("context") else retriever_weights(
        [p["score"] for p in passages], cfg.replug_temperature)
    stops = STOP_SEQUENCES + (["\n"] if cfg.stop_at_newline else [])
    gen = replug_generate(lm.model.decoder, lm.tokenizer, prompts, prior, cfg.max_new_tokens,
                          stops)
    prediction = clean_answer(gen.text)
    return {"id": row["id"], "question": row["question"], "answers": row["answers"],
            "prediction": prediction, "raw": gen.text, **qa_scores(prediction, row["answers"]),
            "passage_ids": [passage_id(p) for p in passages], "encoder_passage_ids": [],
            "answer_in_prompt": any(answer_in_text(t, row["answers"]) for t in texts),
            "prompt_tokens": max(len(p) for p in prompts),
            "prior": [round(w, 4) for w in gen.prior],
            "posterior": [round(w, 4) for w in gen.posterior], "logprob": gen.logprob}
