"""The document split every stage agrees on: train (the retrieval DB and training sequences),
valid and heldout, as a seeded permutation of the corpus scan's document order.

It lives with the corpora because more than retrieval needs it: the BPE tokenizer trains on
the train split only, and the kNN-LM datastore covers the train split.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, model_validator

from retro.platform.errors import UserError
from retro.platform.registry import StrictModel

SPLITS = {"train": 0, "valid": 1, "heldout": 2}


class SplitConfig(StrictModel):
    """How documents are divided between the DB/training, validation and held-out sets."""

    valid: float = Field(0.02, ge=0, lt=1)
    """Fraction of documents for validation sequences (never in the DB)."""
    heldout: float = Field(0.01, ge=0, lt=1)
    """Fraction of documents held out of both training and the DB."""
    seed: int = 0
    """Seed of the document permutation."""

    @model_validator(mode="after")
    def _room_for_train(self) -> "SplitConfig":
        if self.valid + self.heldout >= 1:
            raise ValueError(f"valid + heldout = {self.valid + self.heldout} leaves no training "
                             "documents; keep their sum below 1")
        return self


def assign_splits(n_docs: int, split: SplitConfig) -> np.ndarray:
    """Split code (0 train, 1 valid, 2 heldout) of every document.

    A non-zero fraction gets at least one document, and train keeps at least one.
    """
    def count(frac: float) -> int:
        return 0 if frac == 0 else max(1, round(frac * n_docs))

    n_valid, n_held = count(split.valid), count(split.heldout)
    if n_valid + n_held >= n_docs:
        raise UserError(f"retriever.split: {n_docs} documents cannot give {n_valid} valid and "
                        f"{n_held} heldout documents and keep one for training; use more "
                        "documents or smaller fractions")
    perm = np.random.default_rng(split.seed).permutation(n_docs)
    out = np.zeros(n_docs, dtype=np.uint8)
    out[perm[:n_valid]] = SPLITS["valid"]
    out[perm[n_valid:n_valid + n_held]] = SPLITS["heldout"]
    return out
