"""A bf16-stored checkpoint (the usual format of HF LLMs, and the 48B spec's GPT 43B) gives an
fp32 model: master weights and optimizer state are fp32 whatever the checkpoint's dtype
(issue 13 defect 1; compute precision comes only from the spec's `precision`)."""

from __future__ import annotations

import torch

from retro.components.models.retro import RetroForCausalLM, build_model, init_from_gpt
from tests.models.helpers import inputs, tiny

M = 16


def _bf16_gpt(tmp_path):
    """retro-nano's decoder saved as transformers bf16 safetensors (config dtype bfloat16)."""
    gpt = build_model(tiny(retro=False), 512, M)
    gpt.decoder.to(torch.bfloat16).save_pretrained(tmp_path / "gpt")
    return tmp_path / "gpt", gpt


def _dtypes(model):
    return {p.dtype for p in model.parameters()} | {b.dtype for b in model.buffers()
                                                    if b.is_floating_point()}


def test_retro_fit_from_a_bf16_checkpoint_is_fp32_and_forwards_on_cpu(tmp_path):
    path, gpt = _bf16_gpt(tmp_path)
    model = build_model(tiny(init=str(path)), 512, M, load_init=True)
    assert _dtypes(model) == {torch.float32}
    # the checkpoint's values, exactly (bf16 -> fp32 is lossless)
    want = gpt.decoder.state_dict()
    got = model.decoder.state_dict()
    assert all(torch.equal(got[k], want[k].float()) for k in want)
    ids, nb = inputs(m=M)
    out = model(ids, neighbours=nb, labels=ids)      # crashed: "expected m1 and m2 ... dtype"
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.loss)

    fresh = build_model(tiny(), 512, M)               # init_from_gpt: the same fp32 result
    init_from_gpt(fresh, path)
    assert _dtypes(fresh) == {torch.float32}
    # dims from the checkpoint's config (which records bfloat16), weights loaded later (resume)
    assert _dtypes(build_model(tiny(init=str(path)), 512, M)) == {torch.float32}


def test_from_pretrained_of_a_bf16_retro_checkpoint_is_fp32(tmp_path):
    model = build_model(tiny(), 512, M)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "retro")
    loaded = RetroForCausalLM.from_pretrained(tmp_path / "retro")
    assert _dtypes(loaded) == {torch.float32}
    ids, nb = inputs(m=M)
    assert loaded(ids, neighbours=nb).logits.dtype == torch.float32


def test_training_from_a_bf16_checkpoint_keeps_fp32_masters_and_updates_every_weight(tmp_path):
    """At the 43B lr (9e-6, REFERENCE §3) bf16 master weights round most updates away; fp32
    masters change every trained weight."""
    from tests.training.helpers import job as make_job
    from tests.training.helpers import model_factory
    from retro.components.training.checkpoint import (STATE_FILE, LocalRuntime,
                                                         read_checkpoint)
    from retro.components.training.loop import train

    path, gpt = _bf16_gpt(tmp_path)
    rows = torch.randint(0, 512, (32, 64), generator=torch.Generator().manual_seed(0))
    import numpy as np

    np.save(tmp_path / "train.npy", rows.numpy().astype(np.uint16))
    node = {"type": "retro", "preset": "retro-nano", "retro": False, "init": str(path)}
    j = make_job(tmp_path / "job", tmp_path / "train.npy", steps=2, global_batch=4, lr=9e-6,
                 model=model_factory(node, m=M))
    train(j, LocalRuntime(tmp_path / "ckpt"))
    ckpt = next((tmp_path / "ckpt").rglob(STATE_FILE)).parent
    msd, osd, _ = read_checkpoint(ckpt)
    assert {v.dtype for v in msd.values() if v.is_floating_point()} == {torch.float32}
    states = [s for s in osd["state"].values()]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    before = {k: v.float() for k, v in gpt.decoder.state_dict().items()}
    trained = {k.removeprefix("decoder."): v for k, v in msd.items() if k.startswith("decoder.")}
    big = [k for k, v in before.items() if v.ndim >= 2 and k in trained]
    changed = sum(int((trained[k] != before[k]).float().mean() > 0.99) for k in big)
    assert changed == len(big)


def test_the_loop_trains_fp32_masters_even_from_a_bf16_builder(tmp_path):
    """Whatever a stage's builder returns (e.g. a bf16 model), AdamW steps fp32 weights."""
    import numpy as np

    from tests.training.helpers import job as make_job
    from retro.components.training.checkpoint import (STATE_FILE, LocalRuntime,
                                                     read_checkpoint)
    from retro.components.training.loop import train

    np.save(tmp_path / "train.npy", np.random.default_rng(0).integers(0, 512, (16, 32))
            .astype(np.uint16))
    j = make_job(tmp_path / "job", tmp_path / "train.npy", seq_length=32, steps=1,
                 global_batch=4, model=lambda: build_model(tiny(retro=False), 512, M)
                 .to(torch.bfloat16))
    train(j, LocalRuntime(tmp_path / "ckpt"))
    msd, osd, _ = read_checkpoint(next((tmp_path / "ckpt").rglob(STATE_FILE)).parent)
    assert {v.dtype for v in msd.values() if v.is_floating_point()} == {torch.float32}
    assert all(s["exp_avg"].dtype == torch.float32 for s in osd["state"].values())
