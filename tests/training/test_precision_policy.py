"""bf16 compute with fp32 masters (issue 15 point 2), without FSDP: the bf16 copy is the
masters rounded to bf16, micro-batch gradients accumulate in fp32 on the masters, AdamW's
state is fp32, and the numbers stay within bf16 rounding of fp32. The FSDP2 policy and the
2-worker paths are in test_distributed_precision.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retro.components.training.precision_policy import Bf16Compute, PrecisionPolicy
from tests.training.helpers import VOCAB, model_factory, nano

M, N, K = 16, 64, 2


def _model(**fields):
    torch.manual_seed(0)
    return model_factory(nano(retro=True, **fields), m=M)().train()


def _batch(b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, N + 1), generator=g)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:],
            "neighbours": torch.randint(0, VOCAB, (b, N // M, K, 2 * M), generator=g)}


def _loss(model, batch):
    return model(input_ids=batch["input_ids"], neighbours=batch["neighbours"],
                 labels=batch["labels"]).loss


def test_policy_paths():
    assert PrecisionPolicy("fp32", sharded=False).compute(torch.nn.Linear(2, 2)).model \
        .weight.dtype == torch.float32                       # fp32: the model itself
    assert PrecisionPolicy("fp32", sharded=True).fsdp_kwargs() == {}
    assert not PrecisionPolicy("bf16", sharded=True).by_hand
    assert PrecisionPolicy("bf16", sharded=False).by_hand
    mp = PrecisionPolicy("bf16", sharded=True).fsdp_kwargs()["mp_policy"]
    assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)


def test_copy_is_the_rounded_master_grads_accumulate_in_fp32_and_adamw_state_is_fp32():
    master = _model()
    compute = Bf16Compute(master)
    copy = compute.model
    assert all(p.dtype == torch.bfloat16 for p in copy.parameters())
    assert all(p.dtype == torch.float32 for p in master.parameters())
    # buffers are not cast: rotary frequencies stay fp32 (bf16 would shift long positions)
    assert all(b.dtype == master.get_buffer(n).dtype for n, b in copy.named_buffers())
    assert any(b.dtype == torch.float32 for _, b in copy.named_buffers())
    for m, c in zip(master.parameters(), copy.parameters()):
        assert torch.equal(c, m.to(torch.bfloat16))

    # two micro-batches: the masters' grads are the fp32 sum of the two bf16 gradients
    batch = _batch()
    halves = [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2)]
    by_hand = []
    for half in halves:
        copy.zero_grad(set_to_none=True)
        _loss(copy, half).backward()
        by_hand.append([None if p.grad is None else p.grad.float() for p in copy.parameters()])
    copy.zero_grad(set_to_none=True)
    for half in halves:
        _loss(copy, half).backward()
        compute.after_backward()
        assert all(p.grad is None for p in copy.parameters())
    for m, g1, g2 in zip(master.parameters(), *by_hand):
        if g1 is not None:
            assert m.grad.dtype == torch.float32
            assert torch.equal(m.grad, g1 + g2)

    opt = torch.optim.AdamW(master.parameters(), lr=1e-2)
    opt.step()
    compute.after_step()
    states = [s for s in opt.state.values()]
    assert states and all(s["exp_avg"].dtype == torch.float32 and
                          s["exp_avg_sq"].dtype == torch.float32 for s in states)
    for m, c in zip(master.parameters(), copy.parameters()):   # refreshed from the masters
        assert torch.equal(c, m.to(torch.bfloat16))


def test_bf16_step_is_within_bf16_rounding_of_fp32():
    """bf16 keeps 8 significant bits: rounding to nearest errs by at most u = 2^-9 (0.2%).
    Weights and activations are rounded once per op; the loss is an fp32 mean over 256
    tokens, so its error is a few u at most and averages down (measured 1e-5): bound 1e-3
    (~ 5u). The gradient is a product of ~4 layers' rounded Jacobians: its direction and
    norm stay within a few u too (measured cosine 1 - 1e-6, norm ratio 0.999): bounds cosine
    > 0.999 and norm within 1%. A wrong path (a gradient lost, counted twice, taken from a
    stale copy) misses them by far."""
    batch = _batch()
    ref = _model()
    loss32 = _loss(ref, batch)
    loss32.backward()
    master = _model()
    compute = Bf16Compute(master)
    loss16 = _loss(compute.model, batch)
    loss16.backward()
    compute.after_backward()
    assert loss16.dtype == torch.float32                       # fp32 loss from bf16 logits
    loss16, loss32 = float(loss16.detach()), float(loss32.detach())
    assert loss16 != loss32                                    # bf16 really ran
    assert loss16 == pytest.approx(loss32, rel=1e-3)
    g32 = torch.cat([p.grad.flatten() for p in ref.parameters() if p.grad is not None])
    g16 = torch.cat([p.grad.flatten() for p in master.parameters() if p.grad is not None])
    cos = float(torch.nn.functional.cosine_similarity(g32, g16, dim=0))
    assert cos > 0.999
    assert float(g16.norm() / g32.norm()) == pytest.approx(1.0, abs=0.01)


# a model builder whose first decoder MLP records the dtype of the weights it runs with
SEEN: list = []


def _recording_model():
    model = model_factory(nano(retro=True), m=M)()
    up = model.decoder.model.layers[0].mlp.up_proj
    up.register_forward_pre_hook(lambda mod, args: SEEN.append(mod.weight.dtype))
    return model


def test_the_loop_runs_bf16_weights_and_exports_fp32_masters(tmp_path):
    from safetensors import safe_open

    from retro.components.training.checkpoint import LocalRuntime
    from retro.components.training.data import ArrayNeighbours
    from retro.components.training.loop import train
    from tests.training.helpers import job, rows_of

    rng = np.random.default_rng(0)
    walk = (np.cumsum(rng.integers(-2, 3, (8, N)), axis=1) % VOCAB).astype(np.uint16)
    np.save(tmp_path / "train.npy", walk)
    nb = rng.integers(0, VOCAB, (8, N // M, K, 2 * M))
    out = {}
    for precision in ("bf16", "fp32"):
        SEEN.clear()
        j = job(tmp_path / precision, tmp_path / "train.npy", steps=3, global_batch=4,
                micro_batch=2, eval_batches=0, precision=precision, model=_recording_model,
                neighbours=lambda: ArrayNeighbours(nb))
        summary = train(j, LocalRuntime(tmp_path / f"ckpt-{precision}"))
        out[precision] = [r["loss"] for r in rows_of(j.metrics_file) if r["kind"] == "train"]
        want = torch.bfloat16 if precision == "bf16" else torch.float32
        assert summary["precision"] == precision and SEEN and set(SEEN) == {want}
        with safe_open(str(j.final_dir / "decoder" / "model.safetensors"), "pt") as fh:
            assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float32}
    np.testing.assert_allclose(out["bf16"], out["fp32"], rtol=2e-2)
    assert out["bf16"] != out["fp32"]


def test_replicas_average_fp32_gradients_and_keep_unused_ones_none():
    """`before_step` on W replicas: one fp32 all-reduce, divided by W (DDP's mean); a
    parameter no rank gave a gradient keeps None (AdamW then leaves it alone, as under DDP).
    Here a 1-rank gloo group standing in for W = 2: the sum is the rank's own gradient."""
    import torch.distributed as dist

    from tests.training.helpers import free_port

    torch.manual_seed(0)
    master = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    compute = Bf16Compute(master, world=2)
    x = torch.randn(3, 4).to(torch.bfloat16)
    compute.model[0](x).float().sum().backward()          # the second layer gets no gradient
    compute.after_backward()
    local = [None if p.grad is None else p.grad.clone() for p in master.parameters()]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        compute.before_step()
    finally:
        dist.destroy_process_group()
    for p, g in zip(master.parameters(), local):
        if g is None:
            assert p.grad is None
        else:
            assert p.grad.dtype == torch.float32 and torch.equal(p.grad, g / 2)
    assert local[2] is None and local[0] is not None
