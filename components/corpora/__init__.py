"""Corpora: read documents (id, title, text) from files on disk (JSON Lines, text dirs, HF datasets)."""
