"""Where does Retro-fit's gain over GPT-fit come from? Per-sequence gain by neighbour overlap.

Usage: .venv/bin/python -m bench.retro_gain_by_overlap RUN_DIR [--store PATH] [--bins 0 .1 .3 1]

RETRO's leakage analysis groups evaluation chunks by how much of them their neighbours contain,
so that a gain from near-duplicates can be told from one on new text. Here, for every scored validation
sequence: its overlap = the fraction of the bigrams of its chunks 2..L (the tokens that
cross-attend to the previous chunk's neighbours) found in those neighbours + continuations;
its gain = GPT-fit's NLL minus Retro-fit's (and gate 0's minus Retro-fit's), per token, from
the evaluations' per_sequence.jsonl. Printed: per overlap bin, the sequences, their mean
overlap and the token-level ppl of each model on them.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from bench.neighbour_overlap import artifact
from retro.platform.stats import Aggregate, paired_difference

PPL = Aggregate(kind="exp-ratio")


def per_sequence(run: Path, store: Path, name: str) -> dict[int, tuple[float, int]]:
    rows = [json.loads(x) for x in
            (artifact(run, store, name) / "per_sequence.jsonl").read_text().splitlines()]
    return {r["seq"]: (r["nll"], r["tokens"]) for r in rows}


def sequence_overlap(tokens: np.ndarray, ids: np.ndarray, db, pad: int) -> float:
    m, hits, total = db.chunk_length, 0, 0
    for u in range(len(tokens) // m - 1):
        nb = db.neighbour_tokens(ids[u][None])[0].reshape(-1)
        pairs = set(zip(nb[:-1].tolist(), nb[1:].tolist()))
        t = tokens[(u + 1) * m:(u + 2) * m].tolist()
        for p in zip(t[:-1], t[1:]):
            if pad not in p:
                total += 1
                hits += p in pairs
    return hits / max(total, 1)


def main() -> None:
    from retro.components.retrieval.chunking import ChunkDB

    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--store", type=Path, default=None, help="default: <run>/../../store")
    ap.add_argument("--bins", type=float, nargs="+", default=[0, 0.05, 0.1, 0.2, 0.4, 1.0])
    args = ap.parse_args()
    store = args.store or args.run.parent.parent / "store"
    db = ChunkDB(artifact(args.run, store, "chunk-db"), artifact(args.run, store, "tokenize"))
    tokens = np.load(artifact(args.run, store, "sequences-valid") / "tokens.npy")
    neigh = np.load(artifact(args.run, store, "neighbours-valid") / "neighbours.npy")
    models = {"gpt-fit": per_sequence(args.run, store, "eval-ppl-gpt"),
              "retro-fit": per_sequence(args.run, store, "eval-ppl-retro"),
              "gate 0": per_sequence(args.run, store, "eval-ppl-retro-encoder-off")}
    seqs = sorted(models["retro-fit"])
    overlap = np.array([sequence_overlap(tokens[s], neigh[s], db, db.pad_id) for s in seqs])
    print(f"{len(seqs)} sequences; overlap mean {overlap.mean():.3f}, median "
          f"{np.median(overlap):.3f}")
    print("| overlap bin | sequences | mean overlap | " + " | ".join(f"{m} ppl" for m in models)
          + " | Retro-fit vs GPT-fit [95% CI] | gate 0 vs Retro-fit [95% CI] |")
    print("|---" * (5 + len(models)) + "|")
    edges = args.bins
    for lo, hi in zip(edges[:-1], edges[1:]):
        pick = [i for i, o in enumerate(overlap) if lo <= o < hi or (hi == edges[-1] and o == hi)]
        if not pick:
            continue
        nll = {m: np.array([rows[seqs[i]][0] for i in pick]) for m, rows in models.items()}
        n = np.array([models["retro-fit"][seqs[i]][1] for i in pick], dtype=float)
        ppl = {m: math.exp(v.sum() / n.sum()) for m, v in nll.items()}

        def rel(a: str, b: str) -> str:     # paired sequence bootstrap, as `retro report`
            d = paired_difference(nll[a], nll[b], n, n, agg=PPL)
            return f"{100 * d.rel:+.2f}% [{100 * d.rel_lo:+.2f}, {100 * d.rel_hi:+.2f}]"

        print(f"| [{lo:g}, {hi:g}) | {len(pick)} | {overlap[pick].mean():.3f} | "
              + " | ".join(f"{ppl[m]:.2f}" for m in models)
              + f" | {rel('retro-fit', 'gpt-fit')} | {rel('gate 0', 'retro-fit')} |")


if __name__ == "__main__":
    main()
