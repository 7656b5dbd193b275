"""RetroForCausalLM behaviour: causality, gate 0 == decoder, padding, lengths, save/load."""

from __future__ import annotations

import pytest
import torch

from retro.components.models.retro import RetroForCausalLM, build_model
from tests.models.helpers import inputs, tiny

M = 16
FAMILIES = {
    "llama": {},
    "gpt2": {"overrides": {"family": "gpt2", "bias": True}},
    "phi3-partial-rope": {"overrides": {"rotary_percent": 0.5}},
}


def make(family="llama", seed=0, **fields):
    torch.manual_seed(seed)
    model = build_model(tiny(**FAMILIES[family], **fields), None, M)
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_class_per_family(family):
    model = make(family)
    expected = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel",
                "phi3-partial-rope": "Phi3ForCausalLM"}[family]
    assert type(model.decoder).__name__ == expected
    assert model.decoder.config._attn_implementation == "sdpa"
    assert sorted(int(i) for i in model.cca) == [2, 4]


@pytest.mark.parametrize("family", FAMILIES)
def test_changing_later_tokens_leaves_earlier_logits(family):
    model = make(family)
    ids, nb = inputs(n=70, m=M)
    t = 37
    changed = ids.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 7) % 512
    with torch.no_grad():
        a = model(ids, nb).logits
        b = model(changed, nb).logits
    assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=0)
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_neighbours_of_chunk_j_reach_only_from_its_last_token(family):
    model = make(family)
    n = 5 * M + 7  # not a multiple of the chunk length
    ids, nb = inputs(n=n, m=M)
    with torch.no_grad():
        base = model(ids, nb).logits
        for j in range(n // M):
            other = nb.clone()
            other[:, j] = (other[:, j] + 11) % 512
            out = model(ids, other).logits
            first = (j + 1) * M - 1
            assert torch.allclose(base[:, :first], out[:, :first], atol=1e-6, rtol=0), j
            assert (base[:, first:] - out[:, first:]).abs().amax(dim=(0, 2))[0] > 1e-4, j
        # the last, incomplete chunk's neighbours reach no position that exists
        other = nb.clone()
        other[:, -1] = (other[:, -1] + 11) % 512
        assert torch.equal(model(ids, other).logits, base)


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_zero_is_the_bare_decoder_bit_for_bit(family):
    model = make(family)
    ids, nb = inputs(n=53, m=M)
    with torch.no_grad():
        reference = model.decoder(ids).logits
        with_retrieval = model(ids, nb).logits
        model.gate = 0.0
        assert torch.equal(model(ids, nb).logits, reference)
        model.gate = 1.0
        assert torch.equal(model(ids).logits, reference)  # no neighbours: the decoder too
    assert not torch.allclose(with_retrieval, reference)


def test_gpt_preset_without_retro_matches_decoder_and_has_no_retro_parts():
    torch.manual_seed(0)
    model = build_model(tiny(retro=False), None, M).eval()
    assert model.encoder is None and len(model.cca) == 0
    ids, nb = inputs(n=40, m=M)
    with torch.no_grad():
        assert torch.equal(model(ids, nb).logits, model.decoder(ids).logits)


def test_padding_neighbours_do_not_leak_and_stay_finite():
    model = make()
    ids, nb = inputs(n=4 * M, m=M, k=2)
    padded = nb.clone()
    padded[:, :, 1] = -1  # second neighbour missing everywhere
    with torch.no_grad():
        a = model(ids, padded).logits
        b = model(ids, nb[:, :, :1]).logits  # only the first neighbour
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
        # a neighbour cut short with -1 equals the shorter neighbour
        short = nb[:, :, :, : M + 3]
        cut = nb.clone()
        cut[:, :, :, M + 3:] = -1
        assert torch.allclose(model(ids, cut).logits, model(ids, short).logits, atol=1e-5,
                              rtol=0)
        # every neighbour missing: exactly the decoder
        assert torch.equal(model(ids, torch.full_like(nb, -1)).logits, model.decoder(ids).logits)
    # gradients stay finite with some chunks fully padded
    model.train()
    mixed = nb.clone()
    mixed[:, 1] = -1
    out = model(ids, mixed, labels=ids)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("n", [5, M - 1, M, 3 * M + 5, 4 * M])
def test_any_sequence_length_works(n):
    model = make()
    ids, nb = inputs(n=n, m=M)
    out = model(ids, nb, labels=ids)
    assert out.logits.shape == (2, n, 512)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    fewer = nb[:, : max(0, n // M - 1)]  # fewer chunks than complete ones: rest retrieve nothing
    assert model(ids, fewer).logits.shape == (2, n, 512)


def test_bad_neighbour_shapes_raise():
    model = make()
    ids, nb = inputs(n=3 * M, m=M)
    with pytest.raises(ValueError, match="at most ceil"):
        model(ids, torch.cat([nb, nb], dim=1))
    with pytest.raises(ValueError, match="neighbours must be"):
        model(ids, nb[0])


def test_loss_is_masked_mean_over_shifted_labels():
    model = make()
    ids, nb = inputs(n=40, m=M)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    mask = torch.zeros_like(ids)
    mask[:, 10:30] = 1
    out = model(ids, nb, labels=labels, loss_mask=mask)
    ce = torch.nn.functional.cross_entropy(out.logits[:, 10:30].reshape(-1, 512),
                                           labels[:, 10:30].reshape(-1))
    assert torch.allclose(out.loss, ce, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_and_load_round_trip(tmp_path, family):
    from transformers import AutoModelForCausalLM

    model = make(family)
    model.gate = 0.5
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "decoder" / "config.json").is_file()
    loaded = RetroForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    ids, nb = inputs(n=50, m=M)
    with torch.no_grad():
        assert torch.equal(loaded(ids, nb).logits, model(ids, nb).logits)
        decoder = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "decoder").eval()
        assert torch.equal(decoder(ids).logits, model.decoder(ids).logits)
    assert loaded.gate == 0.5 and loaded.config.cca_layers == [2, 4]
