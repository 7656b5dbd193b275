"""How much of the text a Retro model must predict do its neighbours contain?

Usage: .venv/bin/python bench/neighbour_overlap.py RUN_DIR [--split valid] [--store PATH]

For every chunk u of the split's sequences (but the last of each), the target is chunk u+1 (the
tokens whose prediction cross-attends to chunk u's neighbours). Reported, averaged over chunks:
- the fraction of the target's *new* tokens (not in the sequence before it) found in the k
  neighbours + continuations, and the fraction of the target's bigrams found there;
- the same for k random DB chunks + continuations (the chance baseline).
A large gap over the baseline is what a Retro model can exploit; none means retrieval adds
little beyond the sequence's own context, whatever the model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def artifact(run_dir: Path, store: Path, name: str) -> Path:
    plan = json.loads((run_dir / "plan.json").read_text())
    node_id = next(iter(plan["variants"].values()))[name]
    node = next(s for s in plan["stages"] if s["id"] == node_id)
    return store / node["stage"] / node["key"]


def coverage(target: np.ndarray, context: np.ndarray, source: np.ndarray, pad: int):
    """(new-token recall, bigram recall) of `target` in `source`."""
    seen, src = set(context.tolist()), set(source[source != pad].tolist())
    new = [t for t in target.tolist() if t != pad and t not in seen]
    pairs = set(zip(source[:-1].tolist(), source[1:].tolist()))
    bigrams = [p for p in zip(target[:-1].tolist(), target[1:].tolist()) if pad not in p]
    return (np.mean([t in src for t in new]) if new else np.nan,
            np.mean([p in pairs for p in bigrams]) if bigrams else np.nan)


def main() -> None:
    from retro.components.retrieval.chunking import ChunkDB

    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--split", default="valid")
    ap.add_argument("--store", type=Path, default=None, help="default: <run>/../../store")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    store = args.store or args.run.parent.parent / "store"
    db = ChunkDB(artifact(args.run, store, "chunk-db"), artifact(args.run, store, "tokenize"))
    tokens = np.load(artifact(args.run, store, f"sequences-{args.split}") / "tokens.npy")
    neigh = np.load(artifact(args.run, store, f"neighbours-{args.split}") / "neighbours.npy")
    n_seq, per_seq, k = neigh.shape
    L = db.chunk_length
    rng = np.random.default_rng(args.seed)
    rows = {"neighbours": [], "random": []}
    for s in range(n_seq):
        for u in range(per_seq - 1):
            target, context = tokens[s, (u + 1) * L:(u + 2) * L], tokens[s, :(u + 1) * L]
            for name, ids in (("neighbours", neigh[s, u]),
                              ("random", rng.integers(0, db.n_chunks, k))):
                source = db.neighbour_tokens(ids).reshape(-1)
                rows[name].append(coverage(target, context, source, db.pad_id))
    print(f"{args.run.name}: {args.split} split, {n_seq} sequences x {per_seq - 1} targets, k={k}")
    print(f"{'source':<12} {'new-token recall':>17} {'bigram recall':>14}")
    for name, vals in rows.items():
        new, bi = np.nanmean(np.array(vals, dtype=float), axis=0)
        print(f"{name:<12} {new:>17.3f} {bi:>14.3f}")


if __name__ == "__main__":
    main()
