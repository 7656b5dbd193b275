"""The FLOPs-based cost estimate against hand computations, with the MFU as an input (no MFU
picked to land on the paper's GPU-hours), and the plan's resolved schedule for the 48B spec."""

from pathlib import Path

import pytest

from retro.components.recipes.cost import CostAssumption, gpu_hours, training_flops
from retro.platform.units import human

SPEC_48B = Path(__file__).resolve().parents[2] / "specs" / "instructretro-48b.yaml"


def test_flops_and_hours_match_a_hand_computation():
    # 1B decoder params over 10B tokens: 6 * 1e9 * 1e10 = 6e19. A 100M encoder sees
    # k * r / m = 2 * 128 / 64 = 4 encoder tokens per decoder token: 6 * 1e8 * 1e10 * 4 = 2.4e19.
    flops = training_flops(1e9, 1e10, encoder_params=1e8, neighbours=2, retrieved_length=128,
                           chunk_length=64)
    assert flops == pytest.approx(8.4e19, rel=1e-12)
    # A100 bf16 peak 312 TFLOP/s at 50% MFU: 8.4e19 / 1.56e14 s = 538,461.5 s = 149.57 h.
    assert gpu_hours(flops, CostAssumption("A100", 0.5)) == pytest.approx(149.5726, rel=1e-5)
    # H100 989 TFLOP/s at 25%: 8.4e19 / 2.4725e14 / 3600 = 94.37 h.
    assert gpu_hours(flops, CostAssumption("H100", 0.25)) == pytest.approx(94.3714, rel=1e-5)


def test_no_retrieval_is_six_n_d_and_hours_scale_inversely_with_mfu():
    assert training_flops(2e9, 3e9) == 6 * 2e9 * 3e9
    assert training_flops(2e9, 3e9, encoder_params=1e8) == 6 * 2e9 * 3e9  # no neighbours
    f = training_flops(1e9, 1e9)
    assert gpu_hours(f, CostAssumption("A100", 0.2)) == \
        pytest.approx(2 * gpu_hours(f, CostAssumption("A100", 0.4)))
    assert human(48.5e9) == "48.50B" and human(999) == "999"


def test_48b_plan_shows_the_resolved_schedule_and_prices_its_tokens():
    """`retro plan` info of the 48B spec's Retro-fit: 25M samples at GBS 768 = 32,552 steps,
    warmup 16,667 samples = 22 steps, decay 23.75M samples = step 30,925 (REFERENCE §3, 43B
    script); tokens = 32,552 x 768 x 4096 = 102.40B; with `steps=2000` the decay ends at 2000."""
    from retro.components.recipes.instructretro import estimate_training
    from retro.platform.spec import load_spec

    spec = load_spec(SPEC_48B).spec
    info = estimate_training(spec, "retro-fit", {})
    assert info["schedule"] == ("32,552 steps x 768 seqs, lr 9e-06 -> 9e-07 cosine, warmup 22 "
                                "steps, decay ends at step 30,925")
    assert info["tokens"] == "102.40B"
    short = estimate_training(load_spec(SPEC_48B, ["pretrain.fit.steps=2000"]).spec,
                              "retro-fit", {})
    assert "2,000 steps x 768" in short["schedule"] and "decay ends at step 2,000" in \
        short["schedule"]
    assert short["tokens"] == human(2000 * 768 * 4096)
