"""Activation checkpointing per decoder block (issue 15 point 3): the blocks really are
recomputed in backward, the loss and every gradient stay within 1e-6 in fp32 (Retro with
dropout in encoder and CCA, and a plain gpt2-family decoder), the setting reaches the loop from
`resources` and never a stage's key. On 2 workers (DDP, FSDP2): test_distributed_precision.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from retro.components.training.activation_checkpointing import apply_activation_checkpointing
from tests.training.helpers import VOCAB, model_factory, nano

M, N, K = 16, 64, 2
ROOT = Path(__file__).resolve().parents[2]


def _batch(b=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, N + 1), generator=g)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:],
            "neighbours": torch.randint(0, VOCAB, (b, N // M, K, 2 * M), generator=g)}


def _block_runs(model) -> list[int]:
    """Calls of each decoder block's MLP, counted on entry (a recomputed block runs twice;
    the recompute stops once the block's last saved tensor is rebuilt, before the MLP
    returns)."""
    layers = list(model._layers()) + (list(model.encoder.layers) if model.encoder else [])
    counts = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.mlp.register_forward_pre_hook(
            lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def _loss_and_grads(node, every, batch):
    torch.manual_seed(0)
    model = model_factory(node, m=M)().train()
    assert apply_activation_checkpointing(model, every) == (every if every is not True else 1)
    counts = _block_runs(model)
    torch.manual_seed(7)                          # the same dropout masks with and without
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, counts


@pytest.mark.parametrize("node, retrieval", [
    (nano(retro=True, freeze="unfrozen", retro_dropout=0.1, overrides={"dropout": 0.1}),
     True),                                                                     # llama family
    (nano(retro=False, overrides={"family": "gpt2"}), False),                  # gpt2 decoder
])
def test_loss_and_gradients_unchanged_and_blocks_recomputed(node, retrieval):
    batch = _batch()
    if not retrieval:
        batch.pop("neighbours")
    ref, ref_grads, runs = _loss_and_grads(node, False, batch)
    enc = [2, 2] if retrieval else []            # Retro's 2 encoder layers: always recomputed
    assert runs == [1, 1, 1, 1] + [1] * len(enc)
    for every, want in ((True, [2, 2, 2, 2] + enc), (2, [2, 1, 2, 1] + enc)):
        loss, grads, runs = _loss_and_grads(node, every, batch)
        assert runs == want                       # blocks 1, 1 + N, ... recomputed, once
        assert loss == pytest.approx(ref, abs=1e-6)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=1e-6, msg=name)


def test_no_recompute_without_gradients():
    torch.manual_seed(0)
    model = model_factory(nano(retro=True), m=M)().eval()
    apply_activation_checkpointing(model, True)
    runs = _block_runs(model)
    with torch.no_grad():
        model(**_batch())
    assert runs == [1] * 6


def test_the_setting_reaches_the_loop_and_changes_no_key(tmp_path, monkeypatch):
    from retro.components.training.config import TrainSettings, run_settings
    from retro.platform.plan import build_plan
    from retro.platform.spec import load_spec
    from retro.platform.spec.model import ResourceRequest

    assert run_settings(TrainSettings(), ResourceRequest()).activation_checkpointing is False
    assert run_settings(TrainSettings(), ResourceRequest(activation_checkpointing=3)) \
        .activation_checkpointing == 3
    assert run_settings(TrainSettings(), ResourceRequest(activation_checkpointing=True)) \
        .activation_checkpointing is True
    monkeypatch.chdir(tmp_path)
    tiny = ROOT / "specs" / "retro-tiny.yaml"

    def keys(*overrides):
        plan = build_plan(load_spec(tiny, list(overrides)))
        return {s.name: s.key for s in plan.stages}, {
            s.name: s.resources.activation_checkpointing for s in plan.stages}

    base, _ = keys()
    on, settings = keys("resources.default.activation_checkpointing=true",
                        "resources.stages.retro-fit.activation_checkpointing=2")
    assert on == base
    assert settings["retro-fit"] == 2 and settings["gpt-pretrain"] is True


def test_the_loop_checkpoints_and_trains_the_same(tmp_path):
    """train() with `activation_checkpointing: 2` recomputes blocks 1 and 3 and gives the
    losses of the run without (fp32, one process)."""
    from retro.components.training.checkpoint import LocalRuntime
    from retro.components.training.data import ArrayNeighbours
    from retro.components.training.loop import train
    from tests.training.helpers import job, rows_of
    from tests.training import test_distributed_precision as dp

    rng = np.random.default_rng(0)
    walk = (np.cumsum(rng.integers(-2, 3, (8, N)), axis=1) % VOCAB).astype(np.uint16)
    np.save(tmp_path / "train.npy", walk)
    nb = rng.integers(0, VOCAB, (8, N // M, K, 2 * M))
    losses, calls = {}, {}
    for every in (False, 2):
        dp.SEEN.clear()
        j = job(tmp_path / str(every), tmp_path / "train.npy", steps=2, global_batch=4,
                micro_batch=4, eval_batches=0, model=dp.recording_model,
                neighbours=lambda: ArrayNeighbours(nb), activation_checkpointing=every)
        train(j, LocalRuntime(tmp_path / f"ckpt-{every}"))
        losses[every] = [r["loss"] for r in rows_of(j.metrics_file) if r["kind"] == "train"]
        calls[every] = len(dp.SEEN)               # block 1's MLP forwards over 2 steps
    assert calls == {False: 2, 2: 4}
    np.testing.assert_allclose(losses[2], losses[False], rtol=0, atol=1e-6)


def test_a_bare_transformers_decoder_checkpoints_every_block_only():
    from transformers import LlamaConfig, LlamaForCausalLM

    from retro.platform.errors import UserError

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2))
    assert apply_activation_checkpointing(model, False) == 0 and \
        not model.is_gradient_checkpointing
    assert apply_activation_checkpointing(model, True) == 1 and model.is_gradient_checkpointing
    with pytest.raises(UserError, match="resources.stages.x.activation_checkpointing"):
        apply_activation_checkpointing(model, 2, "resources.stages.x.activation_checkpointing")
