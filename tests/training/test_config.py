"""Trainer configs: schedules resolved from spec, preset and fallback; the LR curve."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from retro.components.training.config import FALLBACK, LMTrainer, Schedule, resolve
from retro.components.training.stages import preset_defaults


def test_empty_fit_schedule_takes_the_48b_paper_values():
    """REFERENCE §3 Table 4 / the 43B script: 32.5k steps x 768, 9e-6 -> 9e-7 cosine, warmup
    16,667 samples, decay over 23.75M samples, Adam (0.9, 0.95), wd 0.1, clip 1."""
    node = {"type": "retro", "preset": "instructretro-43b"}
    s = resolve(Schedule(), 4096, preset_defaults(node, "retrofit"))
    assert (s.steps, s.global_batch, s.lr, s.decay) == (32_500, 768, 9e-6, "cosine")
    assert s.min_lr == pytest.approx(9e-7)
    assert (s.warmup_steps, s.decay_steps) == (22, 30_925)   # 16,667 / 768; 23.75M / 768
    assert (s.weight_decay, s.betas, s.grad_clip) == (0.1, (0.9, 0.95), 1.0)
    assert s.steps * s.global_batch * 4096 == pytest.approx(102e9, rel=0.01)


def test_spec_values_win_and_tokens_become_steps():
    node = {"type": "retro", "preset": "instructretro-43b"}
    s = resolve(Schedule(tokens=10_000_000, lr=1e-4), 4096, preset_defaults(node, "retrofit"))
    assert s.steps == math.ceil(10_000_000 / (768 * 4096)) and s.lr == 1e-4
    bare = resolve(Schedule(), 256)                                 # no preset: the fallback
    assert (bare.steps, bare.global_batch, bare.lr) == (FALLBACK["steps"],
                                                        FALLBACK["global_batch"], FALLBACK["lr"])
    tiny = resolve(Schedule(steps=10), 128, preset_defaults({"type": "retro"}, "pretrain"))
    assert tiny.steps == 10 and tiny.lr == 1e-3                     # retro-tiny's own defaults


def test_lr_warms_up_then_decays_to_min_lr():
    s = resolve(Schedule(steps=100, global_batch=8, lr=1.0, min_lr=0.1, warmup=10), 64)
    assert [s.lr_at(i) for i in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert s.lr_at(55) == pytest.approx(0.55)                       # half way down the cosine
    assert s.lr_at(99) == pytest.approx(0.1, abs=1e-3) and s.lr_at(500) == 0.1
    frac = resolve(Schedule(steps=200, warmup=0.05, decay="linear", lr=1.0, min_lr=0.0), 64)
    assert frac.warmup_steps == 10 and frac.lr_at(105) == pytest.approx(0.5)


@pytest.mark.parametrize("bad,match", [
    ({"steps": 5, "tokens": 100}, "not both"),
    ({"warmup": 1.5}, "fraction"),
    ({"lr": 1e-4, "min_lr": 1e-3}, "above lr"),
    ({"betas": (0.9, 1.2)}, "betas"),
    ({"global_batch": 0}, "greater than or equal to 1"),
])
def test_bad_schedules_are_spec_errors(bad, match):
    with pytest.raises(ValidationError, match=match):
        LMTrainer.Config.model_validate({"fit": bad})
