"""Scoring paths move their inputs to the model's device (a stage given a GPU loads the LM on
CUDA, `devices.stage_device`). Simulated without a GPU: the model's parameters live on the
`meta` device and it records the device of every input it receives; results come back on CPU
where the callers need numpy."""

from __future__ import annotations

import numpy as np
import torch
from types import SimpleNamespace

from retro.components.devices import module_device
from retro.components.joint.reader import Rows, token_logprobs
from retro.components.knnlm.ralm import lm_scorer
from retro.components.radit.scoring import answer_logprobs

V = 8


class _MetaLM(torch.nn.Module):
    """Parameters on meta; records input devices; returns CPU logits (so callers can finish)."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(4, V, device="meta")
        self.seen: list[str] = []

    def forward(self, input_ids=None, attention_mask=None, use_cache=None):
        self.seen += [input_ids.device.type] + ([attention_mask.device.type]
                                                 if attention_mask is not None else [])
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, V))


def test_module_device_is_the_parameters_device_and_cpu_without_any():
    assert module_device(_MetaLM()).type == "meta"
    assert module_device(SimpleNamespace()).type == "cpu"


def test_lsr_answer_scoring_feeds_the_model_on_its_device():
    lm = _MetaLM()
    tokens = np.array([[1, 2, 3, 0], [1, 2, 0, 0]])
    mask = np.array([[0, 1, 1, 0], [0, 1, 0, 0]], dtype=np.uint8)
    out, count = answer_logprobs(lm, tokens, mask, batch_size=2)
    assert lm.seen and set(lm.seen) == {"meta"}
    assert out.shape == (2,) and count.tolist() == [2, 1]


def test_ralm_scorer_feeds_the_model_on_its_device():
    lm = _MetaLM()
    score = lm_scorer(lm, pad_id=0, batch=2)
    out = score([[1, 2, 3], [4, 5]], [0, 0], [[2, 3], [5]])
    assert lm.seen and set(lm.seen) == {"meta"}
    assert [len(x) for x in out] == [2, 1]


def test_joint_reader_log_probs_are_computed_on_the_lms_device():
    class _MetaReader(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(4, V, device="meta")
            self.base_model = lambda input_ids: SimpleNamespace(
                last_hidden_state=torch.zeros(*input_ids.shape, 4, device=input_ids.device))

        def get_output_embeddings(self):
            return self.head

    rows = Rows(tokens=np.array([[1, 2, 3, 4]]), loss_mask=np.array([[0, 0, 1, 1]], np.uint8),
                y_mask=np.array([[0, 0, 1, 0]], np.uint8), truncated=0)
    logp, lmask, ymask = token_logprobs(_MetaReader(), rows)
    assert {logp.device.type, lmask.device.type, ymask.device.type} == {"meta"}
