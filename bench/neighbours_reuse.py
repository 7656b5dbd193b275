"""Neighbours stage time with and without reusing the DB embeddings (issue 14 part 3).

Usage: .venv/bin/python bench/neighbours_reuse.py [--spec specs/retro-tiny.yaml] [--repeats 2]

Builds the spec's retrieval DB and index (a `retro-db` run of its corpus, tokenizer and
retriever sections with the spec's pretrain seq_length, in a temporary store), then runs the
real `neighbours` stage function on the train sequences in this process, alternately with the
`embeddings` input (query chunks equal to a DB chunk read its stored vector) and without it
(every query chunk embedded), `--repeats` times each. Prints wall time per run, the reused
fraction, the stage's time split, whether the two artifacts agree, how many sequence chunks
line up with DB chunks today, and how many would if every document started at a chunk boundary
(chunk-aligned sequences, with the padding that costs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def build_db(spec_path: Path, work: Path):
    """The spec's DB stages through the platform; returns {call name: artifact}."""
    from retro.platform import api
    from retro.platform.store import ArtifactStore

    spec = yaml.safe_load(spec_path.read_text())
    seq = spec.get("pretrain", {}).get("seq_length", 2048)
    db_spec = {"name": "neighbours-reuse-bench", "tracking": [{"type": "none"}],
               "store": {"path": str(work / "store"), "runs": str(work / "runs")},
               "recipe": {"type": "retro-db", "seq_length": seq, "splits": ["train"]},
               **{k: spec[k] for k in ("corpus", "tokenizer", "retriever") if k in spec}}
    path = work / "db.yaml"
    path.write_text(yaml.safe_dump(db_spec, sort_keys=False))
    os.environ.setdefault("RETRO_DATA", str(ROOT.parent / "shared" / "data"))
    _, outcome, plan = api.run(path)
    if not outcome.ok:
        raise SystemExit(f"DB build failed: {outcome.failures}")
    store = ArtifactStore(work / "store")
    return {call: store.get(plan.by_id(i).stage, plan.by_id(i).key)
            for call, i in plan.variants["main"].items()
            if store.exists(plan.by_id(i).stage, plan.by_id(i).key)}


def alignment(arts) -> dict:
    """Train sequence chunks equal (EOD-free) to a DB chunk today, and with aligned documents."""
    from retro.components.retrieval.api import ChunkDB, Sequences

    db = ChunkDB(arts["chunk-db"], arts["tokenize"])
    seqs = Sequences(arts["sequences-train"])
    m, eod = db.chunk_length, seqs.eod_id
    offsets = np.load(arts["tokenize"].path / "doc_offsets.npy")
    docs = np.unique(db.chunks[:, 0])
    spans = np.diff(offsets)[docs] + 1                                   # doc + its EOD
    aligned = -(-spans // m) * m
    db_keys = {tuple(t for t in row if t != eod) for row in db.chunk_tokens(np.arange(db.n_chunks))}
    cps = -(-seqs.seq_length // m)
    q = [tuple(t for t in row[j * m:(j + 1) * m] if t != eod) for row in seqs.tokens
         for j in range(cps)]
    return {"queries": len(q), "db_chunks": db.n_chunks,
            "equal_today": sum(x in db_keys for x in q) / len(q),
            "aligned_padding": float(aligned.sum() / spans.sum() - 1)}


def run_stage(arts, tmp: Path, name: str, with_embeddings: bool):
    from retro.components.retrieval.neighbours import neighbours
    from retro.platform.stage import typed_params
    from tests.retrieval.helpers import stage_ctx

    art = arts["neighbours-train"]
    slots = {"sequences": "sequences-train", "chunk_db": "chunk-db", "tokens": "tokenize",
             "tokenizer": "tokenizer", "index": "fill-index"}
    if with_embeddings:
        slots["embeddings"] = "embed"
    ctx = stage_ctx(tmp, name, typed_params("neighbours", art.manifest["params"]),
                    {slot: arts[call].path for slot, call in slots.items()})
    t0 = time.perf_counter()
    summary = neighbours(ctx)
    wall = time.perf_counter() - t0
    return wall, summary, ctx.summary.get("time_s", {}), np.load(ctx.out_dir / "neighbours.npy")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default=str(ROOT / "specs" / "retro-tiny.yaml"))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import faiss
    import torch

    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="retro-bench-nbr-"))
    print(f"load average {os.getloadavg()}; work {work}", flush=True)
    t0 = time.perf_counter()
    arts = build_db(Path(args.spec), work)
    print(f"DB + index + pipeline neighbours built in {time.perf_counter() - t0:.0f} s",
          flush=True)
    print("alignment:", alignment(arts), flush=True)
    ref = np.load(arts["neighbours-train"].file("neighbours.npy"))
    for r in range(args.repeats):
        for reuse in (False, True):
            wall, summary, split, ids = run_stage(arts, work, f"run{r}-{int(reuse)}", reuse)
            print(f"{'reuse' if reuse else 'embed all'}: {wall:.1f} s; reused "
                  f"{summary['reused_db_embeddings']:.1%} of {summary['queries']} query chunks; "
                  f"time split {split}; ids equal to the pipeline's: "
                  f"{np.array_equal(ids, ref)}", flush=True)
    print(f"load average {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
