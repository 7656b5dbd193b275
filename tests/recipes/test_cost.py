"""The FLOPs-based estimate lands near the paper's measured GPU-hours."""

from retro.components.recipes.cost import CostAssumption, gpu_hours, human, training_flops


def test_48b_retrofit_estimate_is_near_the_papers_69995_gpu_hours():
    # Retro 48B: ~42.8B decoder, ~5.6B added (CCA + encoder), 100B tokens (REFERENCE §1.3, §3).
    flops = training_flops(42.8e9 + 3.76e9, 100e9, encoder_params=1.88e9, neighbours=2,
                           retrieved_length=128, chunk_length=64)
    hours = gpu_hours(flops, CostAssumption("A100", 0.40))
    assert 0.7 * 69_995 < hours < 1.3 * 69_995


def test_gpt_costs_less_than_retro_and_scales_with_tokens():
    gpt = training_flops(1e9, 1e9)
    retro = training_flops(1e9, 1e9, encoder_params=1e8, neighbours=2, retrieved_length=128)
    assert retro > gpt and training_flops(1e9, 2e9) == 2 * gpt
    assert human(48.5e9) == "48.50B" and human(999) == "999"
