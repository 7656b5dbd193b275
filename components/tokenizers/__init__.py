"""Decoder tokenizers: GPT-2 BPE files, local HF tokenizer dirs, byte-level BPE trained on the corpus."""
