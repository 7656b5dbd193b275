"""Retro-fitting a local GPT-2 checkpoint; init vs resume; generation with and without retrieval."""

from __future__ import annotations

import pytest
import torch

from retro.components.models.retro import (RetroForCausalLM, build_model, generate,
                                           init_from_gpt)
from retro.platform.errors import InputDataError, UserError
from tests.models.helpers import inputs, node

M = 16


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A random-weight GPT-2-style checkpoint written by transformers' save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=128, n_embd=64, n_layer=4,
                                       n_head=4))
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path)
    return path


def test_gpt2_checkpoint_loads_and_retro_fits(gpt2_dir):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    cfg = node(init=str(gpt2_dir), cca_layers=[2, 4])
    torch.manual_seed(0)
    model = build_model(cfg, 300, M, load_init=True)
    ids, nb = inputs(b=4, n=4 * M, m=M, vocab=300)
    with torch.no_grad():
        model.eval()
        model.gate = 0.0
        assert torch.equal(model(ids, nb).logits, original(ids).logits)
        model.gate = 1.0
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    labels = torch.roll(ids, -1, 1)
    losses = []
    for _ in range(8):
        loss = model(ids, nb, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_init_loads_decoder_only_and_resume_loads_everything(gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = node(init=str(gpt2_dir), cca_layers=[2, 4])
    torch.manual_seed(1)
    a = build_model(cfg, None, M)  # random weights until init_from_gpt
    src = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    assert not torch.equal(a.decoder.transformer.wte.weight, src.transformer.wte.weight)
    encoder_before = a.encoder.layers[0].mlp.up_proj.weight.clone()
    init_from_gpt(a, gpt2_dir)
    for (name, p), q in zip(a.decoder.state_dict().items(), src.state_dict().values()):
        assert torch.equal(p, q), name
    assert torch.equal(a.encoder.layers[0].mlp.up_proj.weight, encoder_before)  # fresh stays
    # a retro checkpoint works as init too (its decoder/), and resume restores every weight
    a.save_pretrained(tmp_path / "retro")
    torch.manual_seed(2)
    b = build_model(cfg, None, M)
    init_from_gpt(b, tmp_path / "retro")
    assert torch.equal(b.decoder.transformer.wte.weight, a.decoder.transformer.wte.weight)
    assert not torch.equal(b.encoder.layers[0].mlp.up_proj.weight, encoder_before)
    resumed = RetroForCausalLM.from_pretrained(tmp_path / "retro")
    assert torch.equal(resumed.encoder.layers[0].mlp.up_proj.weight, encoder_before)


def test_checkpoint_mismatch_errors(gpt2_dir, tmp_path):
    with pytest.raises(UserError, match="does not match preset 'retro-nano'"):
        build_model(node(init=str(gpt2_dir), preset="retro-nano"), None, M)
    with pytest.raises(UserError, match="vocabulary has 300 entries but the tokenizer has 512"):
        build_model(node(init=str(gpt2_dir), cca_layers=[2, 4]), 512, M)
    with pytest.raises(InputDataError, match="no config.json"):
        build_model(node(init=str(tmp_path), cca_layers=[2, 4]), None, M)
    model = build_model(node(preset="retro-nano"), 300, M)
    with pytest.raises(InputDataError, match="does not fit the decoder"):
        init_from_gpt(model, gpt2_dir)


class CharTokenizer:
    """Token id = byte value; enough to exercise decoding and stop sequences."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) % 256 for i in ids).decode("latin-1")


@pytest.mark.parametrize("overrides", [{}, {"family": "gpt2", "bias": True}])
def test_generate_greedy_matches_full_forward_rollout_and_stops(overrides):
    torch.manual_seed(0)
    model = build_model(node(preset="retro-nano", overrides=overrides), 256, M).eval()
    prompt = list(range(65, 65 + 20))
    out = generate(model, CharTokenizer(), prompt, max_new_tokens=12)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out.ids == ids[len(prompt):] and out.stop_reason == "max_new_tokens"
    stop = CharTokenizer().decode(out.ids[3:5])
    cut = generate(model, CharTokenizer(), prompt, max_new_tokens=12, stop_sequences=[stop])
    assert cut.stop_reason == "stop_sequence" and stop not in cut.text
    assert len(cut.ids) <= 5


def test_generate_with_retrieval_calls_retrieve_per_completed_chunk():
    torch.manual_seed(0)
    model = build_model(node(preset="retro-nano"), 256, M).eval()
    seen = []

    def retrieve(text):
        seen.append(text)
        return [[ord(c) for c in (text * 2)[: 2 * M]]]  # one neighbour of r = 2m

    prompt = list(range(97, 97 + 2 * M + 3))
    out = generate(model, CharTokenizer(), prompt, max_new_tokens=M, retrieve=retrieve)
    total = len(prompt) + len(out.ids)
    assert out.retrieved_chunks == len(seen) == (total - 1) // M
    assert seen[0] == CharTokenizer().decode(prompt[:M])
    # retrieval changes the greedy continuation compared with the gated-off model
    off = generate(model, CharTokenizer(), prompt, max_new_tokens=M, retrieve=retrieve, gate=0.0)
    assert off.retrieved_chunks == 0 and model.gate == 1.0
    ids = torch.tensor([prompt + out.ids[:-1]])
    nb = torch.tensor([[[ord(c) for c in (s * 2)[: 2 * M]]] for s in seen])[None]
    with torch.no_grad():
        expected = model(ids, nb[:, : ids.shape[1] // M]).logits[0, -1].argmax()
    assert int(expected) == out.ids[-1]
