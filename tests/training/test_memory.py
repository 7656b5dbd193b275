"""The memory planner: hand-computed state bytes, Korthikanti et al.'s per-layer activation
formula, and `retro plan` marking the 48B spec as fitting its declared devices (and not, with
activation checkpointing off)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from retro.components.training.memory import (ModelShape, Workload, estimate_memory,
                                              layer_activations)

ROOT = Path(__file__).resolve().parents[2]

# A GPT layer as Korthikanti et al. 2022 count it: GELU MLP of width 4h, LayerNorm, dropout.
GPT = ModelShape(params=10**9, trainable=10**9, root_params=10**8, root_trainable=10**8,
                 largest_unit=2 * 10**7, n_layers=24, d=2048, heads=16, kv_dim=2048,
                 ffn=4 * 2048, gated=False, vocab=50257, dropout=True, norm_saves=1)


def test_layer_matches_korthikanti_formula():
    """§4.1, eq. (1) without tensor parallelism: s·b·h·(34 + 5·a·s/h) bytes per layer at 16-bit
    activations, softmax and scores saved (no flash attention)."""
    s, b, h, a = 2048, 2, 2048, 16
    w = Workload(seq=s, micro_batch=b, compute_bytes=2, flash=False)
    assert layer_activations(GPT, w, with_cca=False) == s * b * h * (34 + 5 * a * s / h)


def test_full_recompute_keeps_one_block_input_per_layer():
    """§4.2: full activation recomputation stores 2·s·b·h per layer (16-bit); on top of that,
    backward holds either the head's tensors (first) or one layer rebuilt (the last layer's,
    with every block input still kept), never both."""
    from retro.components.training.memory import head_activations

    s, b, h, n = 1024, 1, 2048, 24
    on = Workload(seq=s, micro_batch=b, compute_bytes=2, checkpoint_every=1)
    off = replace(on, checkpoint_every=0)
    layer = layer_activations(GPT, on, with_cca=False)
    head = head_activations(GPT, on)
    est_on, est_off = estimate_memory(GPT, on), estimate_memory(GPT, off)
    assert est_off.activations == pytest.approx(n * layer + head)
    assert est_on.activations == pytest.approx(n * 2 * s * b * h + max(layer, head))
    every2 = estimate_memory(GPT, replace(on, checkpoint_every=2)).activations
    assert est_on.activations < every2 < est_off.activations


def test_state_bytes_by_hand():
    """AdamW with fp32 masters: 4 + 4 + 8 bytes per trainable parameter, divided by the
    workers under FSDP, replicated (plus fp32 DDP buckets) without."""
    one = estimate_memory(GPT, Workload(seq=8, micro_batch=1, compute_bytes=4))
    assert (one.params, one.grads, one.optimizer, one.buffers) == (4e9, 4e9, 8e9, 0)
    ddp = estimate_memory(GPT, Workload(seq=8, micro_batch=1, workers=8, compute_bytes=4))
    assert (ddp.params, ddp.optimizer, ddp.buffers) == (4e9, 8e9, 4e9)
    # bf16 without FSDP: + the bf16 copy (2 B/param) and its bf16 gradients (2 B/trainable)
    bf16 = estimate_memory(GPT, Workload(seq=8, micro_batch=1, workers=8, compute_bytes=2))
    assert (bf16.params, bf16.optimizer, bf16.buffers) == (4e9, 8e9, 4e9 + 2e9 + 2e9)
    fsdp = estimate_memory(GPT, Workload(seq=8, micro_batch=1, workers=8, fsdp=True,
                                         compute_bytes=2))
    assert (fsdp.params, fsdp.grads, fsdp.optimizer) == (0.5e9, 0.5e9, 1e9)
    # two bf16 unit gathers (current + prefetched) + the unit's fp32 grads; the root
    # gathered in bf16 with its fp32 grads
    assert fsdp.buffers == 2 * 2 * 2e7 + 4 * 2e7 + 2 * 1e8 + 4 * 1e8


def test_frozen_parameters_carry_no_gradient_or_adam_state():
    frozen = replace(GPT, trainable=10**8)
    est = estimate_memory(frozen, Workload(seq=8, micro_batch=1, compute_bytes=4))
    assert (est.params, est.grads, est.optimizer) == (4e9, 4e8, 8e8)


def test_activation_checkpointing_setting_is_validated():
    from pydantic import ValidationError

    from retro.platform.spec.model import ResourceRequest

    assert ResourceRequest(activation_checkpointing=3).activation_checkpointing == 3
    with pytest.raises(ValidationError, match="every N-th"):
        ResourceRequest(activation_checkpointing=0)
    with pytest.raises(ValidationError):
        ResourceRequest(device="tpu-v9")


def _memory(overrides: list[str]) -> dict[str, dict]:
    from retro.platform import api

    _, plan = api.plan(ROOT / "specs" / "instructretro-48b.yaml", overrides)
    return {s.name: s.info for s in plan.stages if "memory/device" in s.info}


def test_48b_plan_fits_its_devices_and_not_without_checkpointing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)           # the plan's store lookups stay out of the repo
    on = _memory([])
    assert set(on) == {"retro-fit", "gpt-fit", "instruct-retro", "instruct-gpt"}
    for name, info in on.items():
        assert info["memory/fits"].startswith("yes"), (name, info)
        assert "checkpointing every block" in info["memory/device"]
    off = _memory(["resources.default.activation_checkpointing=false"])
    assert off["retro-fit"]["memory/fits"].startswith("NO")
    assert "activation checkpointing" in off["retro-fit"]["memory/fits"]
    assert off["instruct-retro"]["memory/fits"].startswith("NO")
    # 512 workers shard 48B of fp32 masters + AdamW to ~1.4 GiB; a 4x smaller cluster
    # multiplies that state by 4
    small = _memory(["resources.stages.retro-fit.num_workers=128"])["retro-fit"]
    assert "adamw 2.8" in small["memory/device"] and "adamw 0.7" in on["retro-fit"][
        "memory/device"]


def test_retro_checkpointing_keeps_sub_block_inputs_and_rebuilds_the_largest_piece():
    """What the loop's checkpointing keeps for Retro (activation_checkpointing.py): each decoder
    block's input, the first CCA block's second segment input and the normed states the
    encoder reads, each encoder sub-block's input (self-attention, cross-attention in the
    first layer, MLP; the first's is the neighbour embeddings), the encoder's final norm input
    and its output. The peak is the largest phase of backward: the head with all of that; the
    last block rebuilt with all of that but the head; or, reached last, the encoder's largest
    sub-block (its MLP over 4x the decoder's tokens, k·r = 4m) rebuilt with the encoder's
    inputs, its output's gradient and the first CCA block's (layer 3 of 6) inputs."""
    from retro.components.training.memory import encoder_sub_blocks, head_activations

    retro = replace(GPT, n_layers=6, cca_layers=2, encoder_layers=2, chunk_length=64,
                    dropout=False, gated=True, norm_saves=2, ffn=5504, vocab=4096)
    w = Workload(seq=2048, micro_batch=1, compute_bytes=4, checkpoint_every=1, neighbours=2,
                 retrieved=128)
    e, t, h = 4, 2048, 2048
    t_enc = 2048 // 64 * 2 * 128                 # 8192 neighbour tokens
    mlp = e * t_enc * h * (2 + 1) + e * t_enc * 5504 * 4   # norm (2 saved) + input, SwiGLU
    assert max(encoder_sub_blocks(retro, w, first=True)) == mlp
    inputs = (6 + 2) * e * t * h                 # incl. the split block's 2 extra
    enc = (2 * 2 + 1 + 2) * e * t_enc * h
    last = layer_activations(retro, w, with_cca=True)     # layer 6 has CCA
    phases = [inputs + enc + head_activations(retro, w), inputs + enc + last,
              (3 + 2) * e * t * h + enc + e * t_enc * h + mlp]
    assert estimate_memory(retro, w).activations == pytest.approx(max(phases))
    assert max(phases) == phases[2]


def test_a_plan_within_the_device_reserve_does_not_fit():
    """The CUDA context, workspaces and allocator fragmentation take max(5%, 1.5 GiB): a stage
    estimated at 97% of the device's total is marked NO, one at 90% fits."""
    from types import SimpleNamespace

    from retro.components.training.memory import GiB, plan_rows

    w = Workload(seq=2048, micro_batch=1, compute_bytes=2)
    total = estimate_memory(GPT, w).total
    for share, verdict in ((0.97, "NO"), (0.90, "yes")):
        device = SimpleNamespace(gpu_memory_gb=total / share / GiB, device=None)
        assert plan_rows(GPT, w, device)["memory/fits"].startswith(verdict), share
    # a small device: the 1.5 GiB floor, not 5%
    small = SimpleNamespace(gpu_memory_gb=total / GiB + 1.0, device=None)
    assert plan_rows(GPT, w, small)["memory/fits"].startswith("NO")
