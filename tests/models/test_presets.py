"""Presets reproduce the papers' sizes, counted on the meta device; spec validation."""

from __future__ import annotations

import resource

import pytest
import torch

from retro.components.models.retro import PRESETS, build_model, count_parameters, estimate
from retro.components.models.retro.presets import cca_layer_rule, swiglu_ffn
from tests.models.helpers import node


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_43b_and_48b_from_the_meta_device():
    peak = rss_mb()
    model = build_model(node(preset="instructretro-43b"), None, 64, device="meta")
    assert all(p.is_meta for p in model.parameters())
    retro = count_parameters(node(preset="instructretro-43b"), None, 64)
    gpt = count_parameters(node(preset="instructretro-43b", retro=False), None, 64)
    assert rss_mb() - peak < 500  # 48B fp32 would be 190 GB; nothing real was allocated
    assert gpt["total"] == pytest.approx(42.8e9, rel=0.02)
    assert retro["total"] == pytest.approx(48.5e9, rel=0.02)
    assert retro["cca_layers"] == list(range(9, 49, 3)) and len(retro["cca_layers"]) == 14
    assert type(model.decoder).__name__ == "Phi3ForCausalLM"  # Llama + partial (50%) RoPE
    cfg = model.decoder.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.intermediate_size) == (48, 8192, 64, 21824)
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.5
    assert not cfg.tie_word_embeddings and cfg.vocab_size == 256_000


@pytest.mark.parametrize("name", [n for n in PRESETS if PRESETS[n].published])
def test_published_sizes(name):
    preset = PRESETS[name]
    tol = 0.02 if name == "instructretro-43b" else 0.03
    retro = count_parameters(node(preset=name), None, 64)
    gpt = count_parameters(node(preset=name, retro=False), None, 64)
    if name == "instructretro-22b":  # scripts' 40/6144/48 give 21.3B; the paper says 22B
        tol = 0.04
    assert gpt["total"] == pytest.approx(preset.published["gpt"], rel=tol)
    assert retro["total"] == pytest.approx(preset.published["retro"], rel=tol)
    assert retro["cca_layers"] == cca_layer_rule(retro["n_layers"])


def test_layer_rule_and_swiglu_width():
    assert cca_layer_rule(12) == [6, 9, 12]
    assert cca_layer_rule(24) == list(range(9, 25, 3))
    assert len(cca_layer_rule(32)) == 8 and len(cca_layer_rule(40)) == 11
    assert swiglu_ffn(8192) == 21824


def test_every_preset_has_training_phases_and_builds_on_meta():
    for name, preset in PRESETS.items():
        assert preset.training, name
        model = build_model(node(preset=name), None, 64, device="meta")
        assert model.n_layers == preset.dims.n_layers
    assert PRESETS["instructretro-43b"].training["retrofit"].global_batch == 768
    assert PRESETS["instructretro-43b"].training["sft"].adam_betas == (0.9, 0.98)


def test_estimate_for_plan():
    info = estimate({"type": "retro", "preset": "instructretro-43b", "freeze": "frozen"})
    assert info["params"].endswith("B") and info["cca_layers"].endswith("(14)")
    assert info["trainable"] == info["retro_added"]


def test_spec_validation_errors():
    with pytest.raises(Exception, match="instructretro-43b"):
        node(preset="instructretro-43")
    with pytest.raises(Exception, match="unknown overrides"):
        node(preset="retro-tiny", overrides={"layers": 3})
    with pytest.raises(Exception, match="not divisible"):
        node(preset="retro-tiny", overrides={"n_heads": 5})
    with pytest.raises(Exception, match="exceed the 6 decoder layers"):
        node(preset="retro-tiny", cca_layers=[3, 7])
    with pytest.raises(Exception, match="gives no layer"):
        node(preset="retro-nano", cca_layers="auto")
    with pytest.raises(Exception, match="increasing"):
        node(preset="retro-tiny", cca_layers=[6, 3])
    with pytest.raises(Exception, match="at most one"):
        node(init="/x", init_gguf={})
    with pytest.raises(Exception, match="needs `init`"):
        node("hf-causal-lm")
    assert node(preset="retro-tiny", overrides={"n_layers": 12}, cca_layers="auto") \
        .resolved_cca_layers(12) == [6, 9, 12]


def test_tiny_counts_equal_real_build():
    torch.manual_seed(0)
    cfg = node(preset="retro-tiny")
    real = build_model(cfg, 1000, 64)
    counts = count_parameters(cfg, 1000, 64)
    assert counts["total"] == sum(p.numel() for p in real.parameters())
    assert counts["decoder"] + counts["retro_added"] == counts["total"]
