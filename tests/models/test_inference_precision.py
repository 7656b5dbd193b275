"""`inference_autocast`: bf16 Linear weights made once, fp32 attention on CPU.

The pre-cast weights are the bf16 values plain autocast would make on every call, so with them
alone the logits are bit for bit plain autocast's; attention in fp32 (the bf16 CPU kernel is
several times slower when decoding: docs/benchmarks.md) only moves the result towards fp32."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from retro.components.models.retro import RetroConfig, RetroForCausalLM, build_model, generate
from retro.components.precision import autocast, bf16_linear_weights, inference_autocast
from tests.models.helpers import node
from tests.models.test_cached_generation import CharTokenizer, neighbours_of

M = 16


def retro_model():
    torch.manual_seed(0)
    model = build_model(node(preset="retro-nano", overrides={"init_std": 0.2}), 256, M).eval()
    model.gate = 4.0
    return model


def hf_llama_tied():
    """A plain HF decoder with its head tied to the input embedding (as SmolLM2's is), wrapped
    the way `load_eval_lm` wraps one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=512, attn_implementation="sdpa")
    decoder = LlamaForCausalLM(cfg)
    decoder.model.embed_tokens.weight.data.normal_(0, 0.5)     # a head that varies the argmax
    return RetroForCausalLM(RetroConfig(decoder=cfg.to_dict(), retro=False),
                            decoder=decoder).eval()


MODELS = pytest.mark.parametrize("make", [retro_model, hf_llama_tied],
                                 ids=["retro", "hf-llama-tied"])


def batch(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 3 * M + 5), generator=g)
    nb = torch.randint(0, 256, (2, 3, 2, 2 * M), generator=g) if model.encoder is not None \
        else None
    return ids, nb


@MODELS
def test_bf16_weight_copies_give_plain_autocast_bit_for_bit(make):
    plain = make()
    fast = copy.deepcopy(plain)
    ids, nb = batch(plain)
    assert bf16_linear_weights(fast) > 0
    with torch.no_grad(), autocast("bf16"):
        want, got = plain(ids, nb).logits, fast(ids, nb).logits
    assert torch.equal(got, want)
    assert all(m.weight.dtype == torch.bfloat16 for m in fast.modules()
               if isinstance(m, torch.nn.Linear))
    assert fast.decoder.get_input_embeddings().weight.dtype == torch.float32   # tied head untied
    assert bf16_linear_weights(fast) == 0                                     # idempotent


@MODELS
def test_inference_autocast_runs_attention_in_fp32_and_stays_near_fp32(make, monkeypatch):
    ref = make()
    fast = copy.deepcopy(ref)
    ids, nb = batch(ref)
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        seen.append(q.dtype)
        return real(q, *args, **kwargs)

    with torch.no_grad():
        want = ref(ids, nb).logits                                   # fp32
        with autocast("bf16"):
            plain = ref(ids, nb).logits                              # bf16 attention too
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        with inference_autocast(fast, "bf16"):
            got = fast(ids, nb).logits
            gen = generate(fast, CharTokenizer(), ids[0].tolist(), M + 3,
                           retrieve=neighbours_of if fast.encoder is not None else None)
    assert seen and set(seen) == {torch.float32}       # every attention call, HF's and Retro's
    assert len(gen.ids) == M + 3
    # as close to fp32 as plain autocast (the bf16 matmuls' rounding dominates both)
    err, err_plain = (got.float() - want).abs().mean(), (plain.float() - want).abs().mean()
    assert err <= 1.05 * err_plain


def test_fp32_leaves_the_model_alone():
    model = retro_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with inference_autocast(model, "fp32"):
        pass
    after = model.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v)
               for k, v in before.items())
    assert not any(getattr(m, "fp32_cpu", False) for m in model.modules())


@pytest.mark.parametrize("masked", [False, True])
def test_packed_one_token_decode_attention_equals_transformers_sdpa(masked):
    """The decode step packs the query heads sharing a key/value head (transformers' own
    `pack_gqa`) instead of `enable_gqa`: the same attention, to fp32 rounding."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from retro.components.models.retro.attention import _hf_attention

    g = torch.Generator().manual_seed(0)
    b, heads, kv_heads, L, d = 2, 6, 2, 37, 16
    q = torch.randn(b, heads, 1, d, generator=g)
    k, v = (torch.randn(b, kv_heads, L, d, generator=g) for _ in range(2))
    mask = None
    if masked:                                           # left padding of row 0
        mask = torch.ones(b, 1, 1, L, dtype=torch.bool)
        mask[0, ..., :5] = False
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False,
                             is_causal=True)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=d ** -0.5)
    got, _ = _hf_attention(module, q, k, v, mask, scaling=d ** -0.5)
    assert got.shape == want.shape == (b, 1, heads, d)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
