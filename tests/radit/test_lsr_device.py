"""LSR computes where its query encoder is: the batch follows `enc.device` (a stage given a
GPU builds the encoder on CUDA). Simulated with the `meta` device: no CPU tensor may mix in."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from retro.components.radit.stages import _LSRData, _log_p_r


class _MetaEncoder:
    device = "meta"

    def __call__(self, texts):
        return torch.empty(len(texts), 4, device="meta")


def test_lsr_batch_moves_to_the_encoders_device():
    n, k, d = 3, 2, 4
    data = _LSRData(["a", "b", "c"], np.ones((n, k, d), np.float32), np.ones((n, k), bool),
                    np.full((n, k), 0.5), "ip")
    cfg = SimpleNamespace(retriever_temperature=1.0)
    log_p, mask, target = _log_p_r(_MetaEncoder(), cfg, data, np.arange(n))
    assert {log_p.device.type, mask.device.type, target.device.type} == {"meta"}
