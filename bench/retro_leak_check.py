"""Check a finished Retro run for leakage: evaluated text must never be retrievable.

Usage: .venv/bin/python -m bench.retro_leak_check RUN_DIR [--store PATH]

Checks, on the run's own artifacts, and prints the counts:
1. no DB chunk belongs to a valid or heldout document;
2. the training sequences hold only train-split documents (never db_only, valid or heldout);
3. no neighbour of a training or validation sequence comes from a document of that sequence
   (so a training chunk's own continuation is never retrieved);
4. no neighbour of a validation sequence comes from any validation document.
Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.neighbour_overlap import artifact


def main() -> None:
    from retro.components.corpora.splits import SPLITS
    from retro.components.retrieval.chunking import ChunkDB
    from retro.components.retrieval.neighbours import Neighbours
    from retro.components.retrieval.sequences import Sequences

    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--store", type=Path, default=None, help="default: <run>/../../store")
    args = ap.parse_args()
    store = args.store or args.run.parent.parent / "store"
    cdb = artifact(args.run, store, "chunk-db")
    db = ChunkDB(cdb, artifact(args.run, store, "tokenize"))
    split = np.load(cdb / "doc_split.npy")
    evaluated = np.flatnonzero((split == SPLITS["valid"]) | (split == SPLITS["heldout"]))
    db_docs = np.unique(np.asarray(db.chunks[:, 0]))
    failures = {"DB chunks of valid/heldout documents": int(np.isin(db_docs, evaluated).sum())}
    print(f"documents: {np.bincount(split, minlength=4).tolist()} (train, valid, heldout, db); "
          f"DB: {db.n_chunks} chunks of {len(db_docs)} documents")
    for name in ("train", "valid"):
        seqs = Sequences(artifact(args.run, store, f"sequences-{name}"))
        nbrs = Neighbours(artifact(args.run, store, f"neighbours-{name}"))
        docs = np.unique(np.concatenate([seqs.docs(i) for i in range(len(seqs))]))
        wrong = int((split[docs] != SPLITS[name]).sum())
        failures[f"{name} sequences' documents outside the {name} split"] = wrong
        own = in_eval = padded = 0
        for i in range(len(seqs)):
            found = db.doc_of(np.asarray(nbrs.ids[i]))
            padded += int((found < 0).sum())
            found = found[found >= 0]
            own += int(np.isin(found, seqs.docs(i)).sum())
            in_eval += int(np.isin(found, evaluated).sum())
        failures[f"{name} neighbours from their own sequence's documents"] = own
        failures[f"{name} neighbours from valid/heldout documents"] = in_eval
        print(f"{name}: {len(seqs)} sequences of {len(docs)} documents, "
              f"{nbrs.ids.size} neighbour slots ({padded} empty)")
    for what, n in failures.items():
        print(f"{'ok  ' if n == 0 else 'FAIL'} {what}: {n}")
    raise SystemExit(1 if any(failures.values()) else 0)


if __name__ == "__main__":
    main()
