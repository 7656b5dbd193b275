"""Before training anything: would a Retro model have anything to copy from a DB of this size?

Usage: .venv/bin/python bench/db_overlap_probe.py JSONL.gz [JSONL.gz ...]
           [--eval-docs 0.04] [--db-docs 0.2 1.0] [--chunk-words 48] [--queries 3000]

Documents (records grouped by `doc_id`, else `id`) are cut into `chunk-words`-word chunks. A
seeded `eval-docs` share of the documents is evaluated; the DB is the first `db-docs` share of
the rest (1.0: all of it), so no evaluated document is ever in the DB. For `queries` random
(chunk, next chunk) pairs of the evaluated documents, BM25 (bm25s) retrieves k = 2 DB chunks for
the chunk; printed: the fraction of the next chunk's word bigrams found in those neighbours + their
continuations (the next chunk of the same document), the same for 2 random DB chunks, and the
share of queries whose neighbours hold more than half of the next chunk's bigrams. Word level,
so it is a cheap proxy for bench/neighbour_overlap.py's token-level measure on a real run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import time
from collections import defaultdict

import numpy as np


def load(paths: list[str]) -> list[str]:
    docs: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        with gzip.open(path, "rt") as fh:
            for line in fh:
                r = json.loads(line)
                docs[r.get("doc_id") or r["id"]].append(r["text"])
    return [" ".join(parts) for parts in docs.values()]


def chunks_of(text: str, m: int) -> list[list[str]]:
    w = text.split()
    return [w[i:i + m] for i in range(0, len(w), m)]


def bigram_recall(target: list[str], source: list[str]) -> float:
    pairs = set(zip(source[:-1], source[1:]))
    bigrams = list(zip(target[:-1], target[1:]))
    return float(np.mean([p in pairs for p in bigrams])) if bigrams else float("nan")


def probe(docs: list[str], eval_share: float, db_share: float, m: int, n_queries: int,
          seed: int = 0, k: int = 2) -> dict:
    import bm25s

    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    n_eval = max(1, round(eval_share * len(docs)))
    evaluated, rest = order[:n_eval], order[n_eval:]
    rest = rest[:max(1, round(db_share * len(rest)))]
    db, owner = [], []
    for d in rest:
        for c in chunks_of(docs[d], m):
            db.append(c)
            owner.append(d)
    model = bm25s.BM25()
    model.index(bm25s.tokenize([" ".join(c) for c in db], stopwords="en", show_progress=False),
                show_progress=False)
    pairs = [(cs[j], cs[j + 1]) for d in evaluated for cs in [chunks_of(docs[d], m)]
             for j in range(len(cs) - 1)]
    pairs = rng.sample(pairs, min(n_queries, len(pairs)))
    hits, _ = model.retrieve(bm25s.tokenize([" ".join(q) for q, _ in pairs], stopwords="en",
                                            show_progress=False), k=k, show_progress=False)

    def with_continuation(i: int) -> list[str]:
        nxt = db[i + 1] if i + 1 < len(db) and owner[i + 1] == owner[i] else []
        return db[i] + ["|"] + nxt + ["|"]

    nbr = [bigram_recall(t, sum((with_continuation(int(i)) for i in hits[q]), []))
           for q, (_, t) in enumerate(pairs)]
    rand = [bigram_recall(t, sum((with_continuation(rng.randrange(len(db))) for _ in range(k)),
                                 [])) for _, t in pairs]
    return {"eval_docs": n_eval, "db_docs": len(rest), "db_chunks": len(db),
            "queries": len(pairs), "neighbours": float(np.nanmean(nbr)),
            "random": float(np.nanmean(rand)),
            "over_half": float(np.mean([r > 0.5 for r in nbr]))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--eval-docs", type=float, default=0.04)
    ap.add_argument("--db-docs", type=float, nargs="+", default=[0.2, 1.0])
    ap.add_argument("--chunk-words", type=int, default=48)
    ap.add_argument("--queries", type=int, default=3000)
    args = ap.parse_args()
    docs = load(args.paths)
    print(f"{len(docs)} documents")
    print("| DB share of the non-evaluated docs | DB docs | DB chunks | queries | bigram recall: "
          "neighbours | random | queries > 50% | s |")
    print("|---|---|---|---|---|---|---|---|")
    for share in args.db_docs:
        t = time.perf_counter()
        r = probe(docs, args.eval_docs, share, args.chunk_words, args.queries)
        print(f"| {share:g} | {r['db_docs']} | {r['db_chunks']} | {r['queries']} | "
              f"{r['neighbours']:.3f} | {r['random']:.3f} | {r['over_half']:.3f} | "
              f"{time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
