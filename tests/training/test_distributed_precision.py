"""bf16 with fp32 masters and activation checkpointing on 2 real gloo workers (issue 15 points
2 and 3), spawned without Ray, in one spawn:

- FSDP2's mixed-precision policy is applied: a unit computes with bf16 (gathered, plain)
  weights while the sharded parameters, their gradients and AdamW's state are fp32 shards.
- The loop under FSDP2 bf16 and under the by-hand bf16 copy (no FSDP, 2 replicas) computes
  with bf16 weights and matches 1-worker bf16 within bf16 rounding.
- Activation checkpointing under FSDP2 (every block) and DDP (every 2nd block) leaves the fp32
  losses of the 1-worker run without checkpointing unchanged (1e-5, the worker-count
  invariance bound of test_distributed.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest

from retro.components.training.checkpoint import LocalRuntime
from retro.components.training.data import ArrayNeighbours
from retro.components.training.loop import train
from tests.training.helpers import VOCAB, job, model_factory, nano, rows_of, spawn_gloo

M, N, K = 16, 64, 2
STEPS, BATCH = 3, 4
HANG_S = 300
SEEN: list = []   # dtypes the first decoder MLP computed with, in this process


def recording_model():
    """nano Retro whose first decoder block records the dtype of the weights its MLP runs
    with, on entering `up_proj` (inside the FSDP unit `mlp`: gathered by then; and reached
    by a recompute, which stops once the block's last saved tensor is rebuilt)."""
    model = model_factory(nano(retro=True), m=M)()
    up = model.decoder.model.layers[0].mlp.up_proj
    up.register_forward_pre_hook(lambda mod, args: SEEN.append(str(mod.weight.dtype)))
    return model


def _policy_check(rank: int) -> dict:
    """One step of `loop._wrap` under FSDP2 with the bf16 policy, observed directly."""
    import torch
    from torch.distributed.tensor import DTensor

    from retro.components.training.loop import _loss_sum, _wrap
    from retro.components.training.precision_policy import PrecisionPolicy

    torch.manual_seed(0)
    model = recording_model()
    full = {n: p.numel() for n, p in model.named_parameters()}
    SEEN.clear()
    wrapped = _wrap(model, True, 2, torch.device("cpu"), policy=PrecisionPolicy("bf16", True))
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, VOCAB, (2, N + 1), generator=g)
    mb = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(2, N),
          "neighbours": torch.randint(0, VOCAB, (2, N // M, K, 2 * M), generator=g)}
    _loss_sum(wrapped, mb, torch.device("cpu")).backward()
    opt.step()
    params = dict(wrapped.named_parameters())
    up = params["decoder.model.layers.0.mlp.up_proj.weight"]
    return {"gathered": list(SEEN),
            "sharded": sorted({str(p.dtype) for p in params.values()}),
            "all_dtensor": all(isinstance(p, DTensor) for p in params.values()),
            "grads": sorted({str(p.grad.dtype) for p in params.values() if p.grad is not None}),
            "adam": sorted({str(s[k].dtype) for s in opt.state.values()
                            for k in ("exp_avg", "exp_avg_sq")}),
            "local_vs_full": [up.to_local().numel(),
                              full["decoder.model.layers.0.mlp.up_proj.weight"]]}


def _worker(rank: int, world: int, port: int, jobs: list, roots: list, obs: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        seen = {"policy": _policy_check(rank)}
        for j, root in zip(jobs, roots):
            runtime = LocalRuntime(Path(root))
            runtime.rank, runtime.world_size = rank, world
            SEEN.clear()
            train(j, runtime)
            seen[j.name] = sorted(set(SEEN))
        Path(obs, f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


def _spawn(jobs: list, roots: list, obs: Path) -> None:
    spawn_gloo(_worker, jobs, [str(r) for r in roots], str(obs), hang_s=HANG_S,
               what="training")


def _losses(j) -> list[float]:
    return [r["loss"] for r in rows_of(j.metrics_file) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("distprec")
    rng = np.random.default_rng(0)
    walk = np.cumsum(rng.integers(-2, 3, (16, N)), axis=1) % VOCAB
    np.save(d / "train.npy", walk.astype(np.uint16))
    return d, functools.partial(ArrayNeighbours, rng.integers(0, VOCAB, (16, N // M, K, 2 * M)))


def _job(out: Path, data, name: str, **run):
    d, nb = data
    j = job(out / name, d / "train.npy", steps=STEPS, global_batch=BATCH, lr=3e-3,
            micro_batch=2, eval_batches=0, model=recording_model, neighbours=nb, **run)
    return dataclasses.replace(j, name=name)


def test_fsdp2_policy_bf16_replicas_and_checkpointing_on_two_workers(data, tmp_path):
    runs = {"fsdp_bf16": dict(fsdp=True, precision="bf16"),
            "ddp_bf16": dict(precision="bf16"),
            "fsdp_ac": dict(fsdp=True, activation_checkpointing=True),
            "ddp_ac": dict(activation_checkpointing=2)}
    two = {name: _job(tmp_path / "two", data, name, **run) for name, run in runs.items()}
    obs = tmp_path / "obs"
    obs.mkdir()
    _spawn(list(two.values()), [tmp_path / "ckpt2" / n for n in two], obs)
    ref = {p: _job(tmp_path / "one", data, p, precision=p) for p in ("bf16", "fp32")}
    for p, j in ref.items():
        train(j, LocalRuntime(tmp_path / "ckpt1" / p))

    for rank in (0, 1):
        seen = json.loads((obs / f"rank{rank}.json").read_text())
        pol = seen["policy"]
        assert pol["gathered"] and set(pol["gathered"]) == {"torch.bfloat16"}
        assert pol["sharded"] == ["torch.float32"] and pol["all_dtensor"]
        assert pol["grads"] == ["torch.float32"] and pol["adam"] == ["torch.float32"]
        local, full = pol["local_vs_full"]
        assert local * 2 == full                                # really sharded
        assert seen["fsdp_bf16"] == seen["ddp_bf16"] == ["torch.bfloat16"]
        assert seen["fsdp_ac"] == seen["ddp_ac"] == ["torch.float32"]
    # bf16 on 2 workers vs 1: the same bf16 rounding per row; only the order of the fp32
    # gradient sums differs, far below bf16's 2^-9
    for name in ("fsdp_bf16", "ddp_bf16"):
        assert len(_losses(two[name])) == STEPS
        np.testing.assert_allclose(_losses(two[name]), _losses(ref["bf16"]), rtol=2e-3,
                                   err_msg=name)
    assert _losses(ref["bf16"]) != _losses(ref["fp32"])
    for name in ("fsdp_ac", "ddp_ac"):
        np.testing.assert_allclose(_losses(two[name]), _losses(ref["fp32"]), rtol=0,
                                   atol=1e-5, err_msg=name)
