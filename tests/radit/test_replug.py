"""REPLUG decoding with a tiny random Llama: one passage is plain greedy decoding, and the
answer's mixture log-probability equals log Σ_c p_R(c) p_LM(y | c∘x) scored by full forwards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retro.components.evaluators.lm import greedy_generate, load_eval_lm
from retro.components.evaluators.replug import passage_prompt, replug_generate
from tests.radit.helpers import tiny_lm

QUESTION = "who got the first nobel prize in physics"
PASSAGES = ["The first Nobel Prize in Physics was awarded in 1901 to Wilhelm Röntgen.",
            "Deadpool 2 is scheduled to be released in the United States on May 18, 2018.",
            "Astatine is a radioactive chemical element with symbol At."]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_eval_lm(tiny_lm(tmp_path_factory.mktemp("lm") / "lm"), threads=2)


def _prompts(lm, passages):
    return [passage_prompt("instructretro", QUESTION, p, lm.tokenizer, 512, 8)
            for p in passages]


def test_prompt_layout_and_cut(lm):
    text = lm.tokenizer.decode(_prompts(lm, PASSAGES[:1])[0])
    assert text.startswith("System: This is a chat")
    assert "User: Background: The first Nobel Prize" in text
    assert text.endswith(f"Answer the following question with a short span. {QUESTION}\n\n"
                         "Assistant: The answer is")
    short = passage_prompt("instructretro", QUESTION, PASSAGES[0] * 20, lm.tokenizer, 120, 8)
    assert len(short) + 8 <= 120 and lm.tokenizer.decode(short).endswith("The answer is")


def test_one_passage_is_greedy_decoding(lm):
    prompt = _prompts(lm, PASSAGES[:1])[0]
    gen = replug_generate(lm.model.decoder, lm.tokenizer, [prompt], np.array([1.0]), 6)
    ref = greedy_generate(lm, prompt, 6, [])
    assert gen.text == ref and len(gen.ids) == 6
    assert gen.posterior == [1.0]


def test_mixture_logprob_equals_weighted_sequence_probabilities(lm):
    prompts = _prompts(lm, PASSAGES)
    prior = np.array([0.5, 0.3, 0.2])
    gen = replug_generate(lm.model.decoder, lm.tokenizer, prompts, prior, 5)
    y = gen.ids
    # log p_LM(y | c∘x) for each passage, by one full forward each
    seq = []
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p + y])
            logp = torch.log_softmax(lm.model.decoder(input_ids=x).logits[0].double(), -1)
            seq.append(float(sum(logp[len(p) - 1 + t, tok] for t, tok in enumerate(y))))
    seq = np.array(seq)
    assert gen.logprob == pytest.approx(math.log(float(np.sum(prior * np.exp(seq)))), abs=1e-6)
    post = prior * np.exp(seq)
    np.testing.assert_allclose(gen.posterior, post / post.sum(), atol=1e-6)
    # the first token is the argmax of Σ_c p_R(c) p_LM(t | c∘x)
    with torch.no_grad():
        first = sum(w * torch.softmax(lm.model.decoder(input_ids=torch.tensor([p])).logits[0, -1]
                                      .double(), -1) for w, p in zip(prior, prompts))
    assert int(first.argmax()) == y[0]


def test_identical_passages_give_the_single_passage_answer(lm):
    prompt = _prompts(lm, PASSAGES[1:2])[0]
    one = replug_generate(lm.model.decoder, lm.tokenizer, [prompt], np.array([1.0]), 6)
    two = replug_generate(lm.model.decoder, lm.tokenizer, [prompt, prompt],
                          np.array([0.4, 0.6]), 6)
    # the k prompts decode as one batch: float32 logits round differently from a batch of 1
    assert one.ids == two.ids and two.logprob == pytest.approx(one.logprob, abs=1e-5)


def test_reading_comprehension_row_answers_from_its_own_paragraph(lm, shared_data):
    """SQuAD under REPLUG: the dataset's paragraph is the one background (prior 1), not the
    retrieved passages (InstructRetro §5.1, REFERENCE §5.1)."""
    from retro.components.evaluators.qa import settings
    from retro.components.evaluators.replug import answer_replug
    from retro.platform import stage as stage_module

    params = {"evaluator": {"type": "qa", "data_dir": str(shared_data), "replug": True,
                            "passages": 2, "max_new_tokens": 3}}
    if hasattr(stage_module, "typed_params"):
        params = stage_module.typed_params("eval-qa", params)
    gold = {"paragraph_id": "p7", "title": "Physics", "text": PASSAGES[0]}
    row = {"id": "q", "question": QUESTION, "answers": ["Röntgen"], "context": gold,
           "passages": [{"chunk_id": 5, "text": PASSAGES[1], "score": 1.0}]}
    rec = answer_replug(lm, settings(params), row)
    assert rec["passage_ids"] == ["p7"] and rec["encoder_passage_ids"] == []
    assert rec["prior"] == [1.0] and rec["answer_in_prompt"]
