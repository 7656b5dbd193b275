"""Fresh encoder / CCA linears follow Megatron's init: normal(0, init_std), and the output
projections of attention and MLP (Megatron's linear_proj / linear_fc2; here o_proj /
down_proj) normal(0, init_std / sqrt(2 L)), L = the decoder's layers
(`scaled_init_method_normal`, REFERENCE §1.3 init std; issue 13 defect 15)."""

from __future__ import annotations

import math

import pytest
import torch

from retro.components.models.retro import build_model
from tests.models.helpers import tiny


@pytest.mark.parametrize("overrides", [{}, {"n_layers": 12}])
def test_output_projections_are_scaled_by_one_over_sqrt_2L(overrides):
    torch.manual_seed(0)
    model = build_model(tiny(overrides={"d_model": 128, "n_heads": 4, "ffn_hidden": 256,
                                        **overrides}, cca_layers=[2, 4]), 512, 16)
    std, layers = model.config.init_std, model.n_layers
    assert layers == overrides.get("n_layers", 4)
    out_w, in_w = [], []
    for part in (model.encoder, model.cca):
        for name, p in part.named_parameters():
            if p.ndim != 2:
                continue
            (out_w if name.endswith(("o_proj.weight", "down_proj.weight")) else in_w).append(p)
    assert out_w and in_w
    measured_out = torch.cat([p.detach().flatten() for p in out_w]).std().item()
    measured_in = torch.cat([p.detach().flatten() for p in in_w]).std().item()
    assert measured_out == pytest.approx(std / math.sqrt(2 * layers), rel=0.03)
    assert measured_in == pytest.approx(std, rel=0.03)
