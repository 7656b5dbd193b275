"""Trainer configs: schedules resolved from spec, preset and fallback; the LR curve."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from retro.components.training.config import (FALLBACK, LMTrainer, Schedule, resolve,
                                              resolve_schedule)
from retro.components.training.stages import preset_defaults


def test_empty_fit_schedule_takes_the_48b_paper_values():
    """REFERENCE §3 (43B script): --train-samples 25,000,000 at GBS 768 -> 32,552 steps
    (Megatron: train_iters = train_samples // global_batch); 9e-6 -> 9e-7 cosine, warmup
    16,667 samples (22 steps), decay 23,750,000 samples (step 30,925), Adam (0.9, 0.95),
    wd 0.1, clip 1 (defect 6: 32,500 or 100B tokens / (768 x 4096) = 31,790 were short)."""
    node = {"type": "retro", "preset": "instructretro-43b"}
    s = resolve_schedule(Schedule(), 4096, preset_defaults(node, "retrofit"))
    assert (s.steps, s.global_batch, s.lr, s.decay) == (32_552, 768, 9e-6, "cosine")
    assert s.min_lr == pytest.approx(9e-7)
    assert (s.warmup_steps, s.decay_steps) == (22, 30_925)   # 16,667 / 768; 23.75M / 768
    assert (s.weight_decay, s.betas, s.grad_clip) == (0.1, (0.9, 0.95), 1.0)
    assert s.steps * s.global_batch == 25_000_000 - 25_000_000 % 768
    v = s.values()                                  # what manifests / resolved.yaml record
    assert (v["steps"], v["warmup_steps"], v["decay_steps"], v["global_batch"]) == \
        (32_552, 22, 30_925, 768)
    assert v["samples"] == 32_552 * 768 and v["tokens"] == 32_552 * 768 * 4096


def test_preset_schedule_rescales_with_the_users_length():
    """Defect 4: with `steps: 2000` the 43B preset's cosine must end at min_lr by step 2000
    (it ended at 8.92e-6 with the decay still pinned at step 30,925); warmup stays 16,667
    samples = 22 steps (REFERENCE §3)."""
    node = {"type": "retro", "preset": "instructretro-43b"}
    s = resolve_schedule(Schedule(steps=2000), 4096, preset_defaults(node, "retrofit"))
    assert (s.steps, s.warmup_steps, s.decay_steps) == (2000, 22, 2000)
    assert s.lr_at(1999) == pytest.approx(9e-7, rel=1e-3)
    by_tokens = resolve_schedule(Schedule(tokens=768 * 4096 * 500), 4096,
                                 preset_defaults(node, "retrofit"))
    assert (by_tokens.steps, by_tokens.decay_steps) == (500, 500)
    by_samples = resolve_schedule(Schedule(samples=768 * 300), 4096,
                                  preset_defaults(node, "retrofit"))
    assert (by_samples.steps, by_samples.decay_steps) == (300, 300)


def test_preset_schedule_rescales_with_the_users_batch():
    """Defect 4: warmup and decay are samples (16,667 and 23.75M, REFERENCE §3), and so is
    the run length (25M): at global_batch 64 warmup is 260 steps, not the 22 of batch 768."""
    node = {"type": "retro", "preset": "instructretro-43b"}
    s = resolve_schedule(Schedule(global_batch=64), 4096, preset_defaults(node, "retrofit"))
    assert s.global_batch == 64
    assert s.warmup_steps == round(16_667 / 64) == 260
    assert s.decay_steps == math.ceil(23_750_000 / 64) == 371_094
    assert s.steps == 25_000_000 // 64 == 390_625


def test_user_decay_and_warmup_in_samples_win():
    s = resolve_schedule(Schedule(steps=100, global_batch=10, warmup_samples=100,
                                  decay_samples=505, lr=1.0, min_lr=0.0), 64)
    assert (s.warmup_steps, s.decay_steps) == (10, 51)
    kept = resolve_schedule(Schedule(steps=100, decay_steps=80), 64,
                            preset_defaults({"type": "retro", "preset": "instructretro-43b"},
                                            "retrofit"))
    assert kept.decay_steps == 80


def test_48b_spec_resolves_to_the_papers_schedule_and_rescales_on_override():
    """Acceptance (issue 13): the shipped 48B spec's Retro-fit runs 32,552 steps; with
    `-o pretrain.fit.steps=2000` its decay ends by step 2000."""
    from retro.platform.spec import load_spec

    spec_path = Path(__file__).resolve().parents[2] / "specs" / "instructretro-48b.yaml"
    for overrides, steps, decay_end in (((), 32_552, 30_925),
                                        (("pretrain.fit.steps=2000",), 2000, 2000)):
        spec = load_spec(spec_path, overrides).spec
        node = spec.model.model_dump(mode="json")
        s = resolve_schedule(spec.pretrain.fit, spec.pretrain.seq_length,
                             preset_defaults(node, "retrofit"))
        assert (s.steps, s.global_batch, s.warmup_steps) == (steps, 768, 22)
        assert s.decay_steps <= decay_end and s.lr_at(s.decay_steps) == pytest.approx(9e-7)


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
    ({"steps": 5, "tokens": 100}, "one of"),
    ({"samples": 5, "steps": 100}, "one of"),
    ({"warmup": 5, "warmup_samples": 100}, "warmup"),
    ({"decay_steps": 5, "decay_samples": 100}, "decay"),
    ({"warmup": 1.5}, "fraction"),
    ({"lr": 1e-4, "min_lr": 1e-3}, "above lr"),
    ({"betas": (0.9, 1.2)}, "betas"),
    ({"global_batch": 0}, "greater than or equal to 1"),
])
def test_bad_schedules_are_spec_errors(bad, match):
    with pytest.raises(ValidationError, match=match):
        LMTrainer.Config.model_validate({"fit": bad})
