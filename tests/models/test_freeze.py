"""Freeze policies hold through a real optimizer step; counts match the module tree."""

from __future__ import annotations

import pytest
import torch

from retro.components.models.retro import apply_freeze, build_model
from retro.platform.errors import UserError
from tests.models.helpers import inputs, tiny

M = 16


def step(model, policy):
    """apply_freeze, one AdamW step on a retrieval batch; returns (before, after) tensors."""
    counts = apply_freeze(model, policy)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.1)
    ids, nb = inputs(n=4 * M, m=M, vocab=512)
    model(ids, nb, labels=torch.roll(ids, -1, 1)).loss.backward()
    opt.step()
    return counts, before, dict(model.named_parameters())


def build(**fields):
    torch.manual_seed(0)
    return build_model(tiny(**fields), None, M).train()


def test_frozen_keeps_every_decoder_tensor_bit_identical():
    model = build()
    counts, before, after = step(model, "frozen")
    for name, p in after.items():
        if name.startswith("decoder."):
            assert not p.requires_grad and torch.equal(p, before[name]), name
        else:
            assert p.requires_grad and not torch.equal(p, before[name]), name
    g = counts["groups"]
    assert g["encoder"]["frozen"] == 0 and g["cca"]["frozen"] == 0
    assert g["decoder.blocks"]["trainable"] == 0 and g["embeddings"]["trainable"] == 0
    assert counts["trainable"] == g["encoder"]["trainable"] + g["cca"]["trainable"]
    assert counts["trainable"] + counts["frozen"] == sum(p.numel() for p in model.parameters())


def test_unfrozen_changes_every_tensor():
    model = build()
    counts, before, after = step(model, "unfrozen")
    assert counts["frozen"] == 0
    for name, p in after.items():
        assert not torch.equal(p, before[name]), name


def test_structural_selectors():
    model = build()
    policy = {"frozen": ["embeddings", "decoder.blocks:1-2", "cca:4"]}
    counts, before, after = step(model, policy)
    for name, p in after.items():
        frozen = (name.startswith("decoder.model.embed_tokens")
                  or name.startswith(("decoder.model.layers.0.", "decoder.model.layers.1."))
                  or name.startswith("cca.4."))
        assert torch.equal(p, before[name]) == frozen, name
    # tied head: the one tensor is frozen through `embeddings`
    assert model.decoder.lm_head.weight is model.decoder.model.embed_tokens.weight
    counts = apply_freeze(model, {"trainable": ["lm_head"]})
    assert counts["trainable"] == model.decoder.lm_head.weight.numel()


def test_build_model_applies_the_spec_policy_and_reports_it():
    model = build(freeze={"trainable": ["encoder", "cca", "decoder.norm"]})
    g = model.freeze_counts["groups"]
    assert g["decoder.norm"]["trainable"] == 64 and g["decoder.blocks"]["trainable"] == 0


def test_policy_errors_are_clear():
    with pytest.raises(Exception, match="unknown freeze selector 'encodr'.*did you mean 'encoder'"):
        tiny(freeze={"frozen": ["encodr"]})
    with pytest.raises(Exception, match="exceeds the 4 decoder layers"):
        tiny(freeze={"frozen": ["decoder.blocks:3-9"]})
    with pytest.raises(Exception, match="exactly one of"):
        tiny(freeze={"frozen": ["cca"], "trainable": ["encoder"]})
    with pytest.raises(UserError, match="no trainable parameter"):
        build_model(tiny(retro=False, freeze="frozen"), None, M)
