"""The training loop in-process (no Ray): learning, exact resume, accumulation, freezing."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from retro.components.training.checkpoint import LocalRuntime, read_checkpoint
from retro.components.training.data import ArrayNeighbours
from retro.components.training.launcher import launch
from retro.components.training.loop import evaluate, train
from retro.components.training.models import build_fresh, load_trained
from retro.platform.errors import UserError
from tests.training.helpers import VOCAB, job, model_factory, nano, rows_of, wiki_rows


@pytest.fixture(scope="module")
def wiki(tmp_path_factory, request):
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("shared data missing")
    return wiki_rows(SHARED_DATA, tmp_path_factory.mktemp("wiki"))


def test_tiny_pretrain_on_wiki_lowers_validation_loss(wiki, tmp_path):
    train_rows, valid_rows = wiki
    j = job(tmp_path / "out", train_rows, valid_rows, steps=30, eval_interval=15,
            micro_batch=8)
    torch.manual_seed(j.seed)
    before = evaluate(j.model(), j.val_data(), j.run, 8, 0, 1, torch.device("cpu"))["val_loss"]
    summary = launch(j, num_workers=1, storage=tmp_path / "work", use_ray=False)
    evals = [r["val_loss"] for r in rows_of(j.metrics_file) if r["kind"] == "eval"]
    assert before == pytest.approx(np.log(VOCAB), abs=0.3)      # random init: uniform-ish
    assert evals[-1] < before - 0.6, (before, evals)
    assert summary["val_loss"] == evals[-1] and summary["steps"] == 30
    # the artifact loads back and gives the same validation loss
    reloaded = load_trained(str(j.final_dir))
    again = evaluate(reloaded, j.val_data(), j.run, 8, 0, 1, torch.device("cpu"))["val_loss"]
    assert again == pytest.approx(evals[-1], abs=1e-5)


class _CrashAt:
    """Training rows whose `batch` raises on the n-th call (a worker dying mid-run)."""

    def __init__(self, inner, n):
        self.inner, self.n, self.calls = inner, n, 0

    def __call__(self):
        rows = self.inner()
        outer = self

        class Rows:
            seq_length = rows.seq_length

            def __len__(self):
                return len(rows)

            def batch(self, idx):
                outer.calls += 1
                if outer.calls == outer.n:
                    raise RuntimeError("worker died")
                return rows.batch(idx)

        return Rows()


def test_resume_after_a_crash_matches_an_uninterrupted_run(wiki, tmp_path):
    """Checkpoint = weights + AdamW state + step (data position, LR) + per-step RNG: with
    dropout on, a run crashed after step 5 and resumed from the step-4 checkpoint ends
    bit-identical to a run that never stopped."""
    train_rows, valid_rows = wiki
    dropout = model_factory(nano(overrides={"dropout": 0.1}))
    kw = dict(steps=6, checkpoint_interval=2, micro_batch=4, model=dropout)
    ref = job(tmp_path / "a", train_rows, valid_rows, **kw)
    train(ref, LocalRuntime(tmp_path / "a-ckpt"))

    crashed = job(tmp_path / "b", train_rows, valid_rows, **kw)
    flaky = dataclasses.replace(crashed, train_data=_CrashAt(crashed.train_data, 5))
    with pytest.raises(RuntimeError, match="worker died"):
        train(flaky, LocalRuntime(tmp_path / "b-ckpt"))
    summary = train(crashed, LocalRuntime(tmp_path / "b-ckpt"))

    assert summary["resumed_from"] == 4
    rows = [r for r in rows_of(crashed.metrics_file) if r["kind"] != "precision"]
    kinds = [(r["kind"], r["step"]) for r in rows]
    assert kinds[:6] == [("train", 1), ("train", 2), ("train", 3), ("train", 4),
                         ("resume", 4), ("train", 5)]
    ref_loss = [r["loss"] for r in rows_of(ref.metrics_file) if r["kind"] == "train"]
    resumed = {r["step"]: r["loss"] for r in rows[5:] if r["kind"] == "train"}
    assert resumed == {5: ref_loss[4], 6: ref_loss[5]}
    a = load_file(str(ref.final_dir / "decoder" / "model.safetensors"))
    b = load_file(str(crashed.final_dir / "decoder" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_micro_batch_size_does_not_change_the_result(wiki, tmp_path):
    train_rows, _ = wiki
    losses = []
    for mb in (1, 8):
        # fp32: bf16 rounding depends on how rows are batched (docs/training.md)
        j = job(tmp_path / f"mb{mb}", train_rows, steps=3, micro_batch=mb, precision="fp32")
        train(j, LocalRuntime(tmp_path / f"ck{mb}"))
        losses.append([r["loss"] for r in rows_of(j.metrics_file) if r["kind"] == "train"])
    np.testing.assert_allclose(losses[0], losses[1], rtol=0, atol=2e-5)


def test_freeze_policy_holds_in_the_final_checkpoint(tmp_path):
    """RETRO's RETROfit (`freeze: frozen`): after real training the decoder equals the GPT it
    started from, in the last resumable checkpoint and in the exported model, while the encoder
    and cross-attention moved."""
    gpt = build_fresh(nano(), VOCAB, 16, retro=False)
    gpt.save_pretrained(tmp_path / "gpt")
    m, n, k = 16, 64, 2
    rng = np.random.default_rng(0)
    np.save(tmp_path / "rows.npy", rng.integers(0, VOCAB, (32, n), dtype=np.int64))
    nb = ArrayNeighbours(rng.integers(0, VOCAB, (32, n // m, k, 2 * m)))
    factory = functools.partial(build_fresh, nano(retro=True, freeze="frozen"), VOCAB, m,
                                retro=True, init_dir=str(tmp_path / "gpt"))
    j = job(tmp_path / "out", tmp_path / "rows.npy", steps=3, model=factory,
            neighbours=lambda: nb, lr=1e-2)
    train(j, LocalRuntime(tmp_path / "ckpt"))

    torch.manual_seed(j.seed)
    start = factory().state_dict()
    ckpt = read_checkpoint(sorted((tmp_path / "ckpt").glob("checkpoint_*"))[-1])[0]
    final = load_trained(str(j.final_dir)).state_dict()
    for state in (ckpt, final):
        decoder = [key for key in start if key.startswith("decoder.")]
        retro = [key for key in start if key.startswith(("encoder.", "cca."))]
        assert decoder and retro
        assert all(torch.equal(state[key], start[key]) for key in decoder)
        assert sum(not torch.equal(state[key], start[key]) for key in retro) > len(retro) // 2


def test_resuming_a_checkpoint_of_another_model_is_refused(wiki, tmp_path):
    train_rows, _ = wiki
    small = job(tmp_path / "a", train_rows, steps=2, checkpoint_interval=1)
    train(small, LocalRuntime(tmp_path / "ckpt"))
    wider = job(tmp_path / "b", train_rows, steps=4,
                model=model_factory(nano(overrides={"d_model": 128, "ffn_hidden": 256})))
    with pytest.raises(UserError, match="does not match the model"):
        train(wider, LocalRuntime(tmp_path / "ckpt"))
