"""The document split every stage agrees on: train (the retrieval DB and training sequences),
valid, heldout and db (the retrieval DB only), as a seeded permutation of the corpus scan's
document order.

It lives with the corpora because more than retrieval needs it: the BPE tokenizer trains on
the train split only, and the kNN-LM datastore covers the train split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field, model_serializer, model_validator

from retro.platform.errors import UserError
from retro.platform.registry import StrictModel

SPLITS = {"train": 0, "valid": 1, "heldout": 2, "db": 3}


class SplitConfig(StrictModel):
    """How documents are divided between the DB/training, validation and held-out sets."""

    valid: float = Field(0.02, ge=0, lt=1)
    """Fraction of documents for validation sequences (never in the DB)."""
    heldout: float = Field(0.01, ge=0, lt=1)
    """Fraction of documents held out of both training and the DB."""
    seed: int = 0
    """Seed of the document permutation."""
    db_only: float = Field(0.0, ge=0, lt=1)
    """Fraction of documents that enter the retrieval DB but never a training sequence (nor
    the trained tokenizer): a DB larger than the LM's training split, RETRO's setting. The valid
    and heldout documents are the same whatever this is, so runs that differ only here are
    scored on the same text; they never enter the DB."""

    @model_validator(mode="after")
    def _room_for_train(self) -> "SplitConfig":
        if self.valid + self.heldout + self.db_only >= 1:
            raise ValueError(f"valid + heldout + db_only = "
                             f"{self.valid + self.heldout + self.db_only} leaves no training "
                             "documents; keep their sum below 1")
        return self

    @model_serializer(mode="wrap")
    def _omit_zero_db_only(self, handler: Any) -> dict[str, Any]:
        # db_only: 0 dumps as before the field existed, so stage keys of existing specs hold
        out = handler(self)
        if not self.db_only:
            out.pop("db_only", None)
        return out


def assign_splits(n_docs: int, split: SplitConfig) -> np.ndarray:
    """Split code (0 train, 1 valid, 2 heldout, 3 db) of every document.

    A non-zero fraction gets at least one document, and train keeps at least one. valid and
    heldout take the permutation's first documents, db_only the next ones, so `db_only` never
    changes which documents are evaluated.
    """
    def count(frac: float) -> int:
        return 0 if frac == 0 else max(1, round(frac * n_docs))

    n_valid, n_held, n_db = count(split.valid), count(split.heldout), count(split.db_only)
    if n_valid + n_held + n_db >= n_docs:
        raise UserError(f"retriever.split: {n_docs} documents cannot give {n_valid} valid, "
                        f"{n_held} heldout and {n_db} db_only documents and keep one for "
                        "training; use more documents or smaller fractions")
    perm = np.random.default_rng(split.seed).permutation(n_docs)
    out = np.zeros(n_docs, dtype=np.uint8)
    out[perm[:n_valid]] = SPLITS["valid"]
    out[perm[n_valid:n_valid + n_held]] = SPLITS["heldout"]
    out[perm[n_valid + n_held:n_valid + n_held + n_db]] = SPLITS["db"]
    return out


def in_db(doc_split: np.ndarray) -> np.ndarray:
    """Which documents the retrieval DB holds: train and db_only, never valid or heldout."""
    return (doc_split == SPLITS["train"]) | (doc_split == SPLITS["db"])
