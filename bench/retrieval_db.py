"""Retrieval DB benchmarks on the wiki featured passages (issue 3). Not a test: numbers + commands
go to docs/benchmarks.md ("Retrieval").

    python bench/retrieval_db.py build    # full-corpus DB + index (retro-db, no neighbours) + BM25
    python bench/retrieval_db.py embed    # embed-stage path vs a plain transformers forward
    python bench/retrieval_db.py index    # build time, qps, recall@2/@10 vs exact Flat
    python bench/retrieval_db.py qa       # dense vs BM25 answer recall@20 on NQ-open test
    python bench/retrieval_db.py scale    # DB build time and peak RSS at 1x and 4x corpus size

Every command appends a JSON line to <work>/results.jsonl. `index`, `embed` and `qa` read the
artifacts `build` made (same --work).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml

DATA = Path(os.environ.get("RETRO_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
WIKI = DATA / "wiki_featured_passages"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# HNSW32 efSearch 64: recall@2 0.996 at 11x exact Flat on the full corpus (docs/benchmarks.md)
FACTORY = {"type": "faiss", "factory": "HNSW32,Flat", "ef_search": 64}


def sections(max_documents=None, index=None, splits=(), retriever_type="dense"):
    corpus = {"type": "jsonl", "paths": [str(WIKI / "passages.part-*.jsonl.gz")]}
    if max_documents:
        corpus["max_documents"] = max_documents
    retriever = {"type": retriever_type}
    if retriever_type == "dense":
        retriever.update(index=index or FACTORY,
                         quality={"probe_size": 2000})
    return {"recipe": {"type": "retro-db", "seq_length": 2048, "splits": list(splits)},
            "corpus": corpus,
            "tokenizer": {"type": "gpt2-files", "path": str(DATA / "tokenizer_gpt2")},
            "retriever": retriever}


def run_spec(work: Path, name: str, workers: int, **secs):
    from retro.platform import api
    from retro.platform.store import ArtifactStore

    resources = {"default": {"num_workers": workers}, **secs.pop("resources", {})}
    spec = {"name": name, "tracking": [{"type": "none"}],
            "store": {"path": str(work / "store"), "runs": str(work / "runs")},
            "resources": resources, **secs}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    t0 = time.time()
    _, outcome, plan = api.run(path)
    wall = time.time() - t0
    if not outcome.ok:
        raise SystemExit(f"{name} failed: {outcome.failures}")
    store = ArtifactStore(work / "store")
    arts = {c: store.get(plan.by_id(i).stage, plan.by_id(i).key)
            for c, i in plan.variants["main"].items()}
    return wall, arts, outcome


def stage_seconds(arts):
    return {c: a.manifest["seconds"] for c, a in arts.items()}


def emit(work: Path, record: dict) -> None:
    record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), **record}
    print(json.dumps(record, indent=1, default=float), flush=True)
    with open(work / "results.jsonl", "a") as fh:
        fh.write(json.dumps(record, default=float) + "\n")


def cmd_build(args):
    wall, arts, _ = run_spec(args.work, "full-dense", args.workers,
                             **sections(max_documents=args.max_docs))
    summaries = {c: a.manifest["summary"] for c, a in arts.items()}
    emit(args.work, {"bench": "build", "wall_s": wall, "stage_s": stage_seconds(arts),
                     "tokenize": summaries["tokenize"], "chunk_db": summaries["chunk-db"],
                     "embed": summaries["embed"], "quality": summaries["retrieval-quality"]})
    wall, arts, _ = run_spec(args.work, "full-bm25", args.workers,
                             **sections(max_documents=args.max_docs, retriever_type="bm25"))
    emit(args.work, {"bench": "build-bm25", "wall_s": wall, "stage_s": stage_seconds(arts)})


def _full_artifacts(args, retriever_type="dense"):
    _, arts, outcome = run_spec(args.work, f"full-{retriever_type}", 1,
                                **sections(max_documents=args.max_docs,
                                           retriever_type=retriever_type))
    if any(s != "cached" for s in outcome.states.values()):
        print("warning: some stages were not cached; run `build` first", file=sys.stderr)
    return arts


def cmd_embed(args):
    """Chunks/s of the embed stage's own code path vs a bare forward on the same batches."""
    import torch
    from transformers import AutoModel

    from retro.components.retrieval.chunking import ChunkDB, raw_tokenizer
    from retro.components.retrieval.common import build_component

    torch.set_num_threads(args.threads)
    arts = _full_artifacts(args)
    db = ChunkDB(arts["chunk-db"], arts["tokenize"])
    decoder = raw_tokenizer(arts["tokenizer"])
    embedder = build_component("embedder", {"type": "hf-mean-pool"})
    embedder.load()
    n = args.n
    texts = db.texts(0, n, decoder)
    model = AutoModel.from_pretrained(embedder.path).eval()
    # the batches the stage forms: windows of `window`, sorted by length, cut into batch_size
    batches = []
    for a in range(0, n, embedder.window):
        enc = embedder.tokenize(texts[a:a + embedder.window])
        order = np.argsort([len(x) for x in enc["input_ids"]], kind="stable")
        for b in range(0, len(order), embedder.config.batch_size):
            rows = order[b:b + embedder.config.batch_size]
            batches.append(embedder.tokenizer.pad(
                {"input_ids": [enc["input_ids"][i] for i in rows]}, return_tensors="pt"))

    def plain():
        with torch.inference_mode():
            for batch in batches:
                model(**batch)

    def ours():  # decode + re-tokenize + sort + forward + pool + normalise
        for a in range(0, n, embedder.window):
            embedder.embed_tokenized(embedder.tokenize(
                db.texts(a, min(a + embedder.window, n), decoder)))

    wall, cpu = {"plain": [], "ours": []}, {"plain": [], "ours": []}
    for _ in range(args.repeats):
        for name, fn in (("ours", ours), ("plain", plain)):
            t0, c0 = time.time(), time.process_time()
            fn()
            wall[name].append(time.time() - t0)
            cpu[name].append(time.process_time() - c0)
    best = {k: min(v) for k, v in cpu.items()}  # CPU time: robust on a shared machine
    emit(args.work, {"bench": "embed", "chunks": n, "threads": args.threads,
                     "ours_chunks_per_cpu_s": n / best["ours"],
                     "plain_chunks_per_cpu_s": n / best["plain"],
                     "ratio": best["plain"] / best["ours"],
                     "wall_ratio": min(wall["plain"]) / min(wall["ours"]),
                     "wall_s": wall, "cpu_s": cpu})


def _queries(arts, n_chunks: int, n_questions: int, seed: int = 0):
    from retro.components.retrieval.common import build_component

    emb = np.load(arts["embed"].file("embeddings.npy")).astype(np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(len(emb), n_chunks, replace=False))
    questions = [q["question"] for q in _nq()][:n_questions]
    qemb = build_component("embedder", {"type": "hf-mean-pool"}).embed(questions)
    return emb, {"db-chunks": emb[rows], "nq-questions": qemb}


def _timed_search(index, q, k):
    """ids and queries per CPU-second (one faiss thread: robust on a shared machine)."""
    c0 = time.process_time()
    _, ids = index.search(q, k)
    return ids, len(q) / (time.process_time() - c0)


def cmd_index(args):
    """Build each index on the full DB embeddings; qps and recall@2/@10 vs exact Flat."""
    import faiss

    from retro.components.retrieval.quality import recall_at

    faiss.omp_set_num_threads(args.threads)
    arts = _full_artifacts(args)
    emb, queries = _queries(arts, 2000, 1000)
    flat = faiss.IndexFlatIP(emb.shape[1])
    flat.add(emb)
    exact = {name: _timed_search(flat, q, 10) for name, q in queries.items()}
    emit(args.work, {"bench": "index-flat", "n": len(emb), "threads": args.threads,
                     "qps": {k: v[1] for k, v in exact.items()}})
    rng = np.random.default_rng(0)
    train = emb[np.sort(rng.choice(len(emb), min(100_000, len(emb)), replace=False))]
    configs = [("IVF2048,Flat", "nprobe", [8, 16, 32, 64]),
               ("IVF2048,SQ8", "nprobe", [16, 32, 64]),
               ("HNSW32,Flat", "efSearch", [32, 64, 128]),
               ("OPQ32_128,IVF2048_HNSW32,PQ32", "nprobe", [32, 64, 128])]
    for factory, param, values in configs:
        index = faiss.index_factory(emb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        t0, c0 = time.time(), time.process_time()
        index.train(train)
        t_train, c_train = time.time() - t0, time.process_time() - c0
        t0, c0 = time.time(), time.process_time()
        index.add(emb)
        t_add, c_add = time.time() - t0, time.process_time() - c0
        for v in values:
            faiss.ParameterSpace().set_index_parameter(index, param, v)
            row = {"bench": "index", "factory": factory, param: v, "train_s": t_train,
                   "add_s": t_add, "train_cpu_s": c_train, "add_cpu_s": c_add,
                   "threads": args.threads}
            for name, q in queries.items():
                ids, qps = _timed_search(index, q, 10)
                row[name] = {"qps": qps, "speedup_vs_flat": qps / exact[name][1],
                             "recall@2": recall_at(ids, exact[name][0], 2),
                             "recall@10": recall_at(ids, exact[name][0], 10)}
            emit(args.work, row)


def _nq():
    import gzip

    with gzip.open(DATA / "nq_open" / "nq_open_test.jsonl.gz", "rt") as fh:
        return [q for q in map(json.loads, fh) if q["answer_in_wiki_featured"]]


def _normalize_tokens(text: str) -> list[str]:
    import re
    import unicodedata

    text = unicodedata.normalize("NFD", text).lower()
    return re.findall(r"\w+|[^\w\s]", text)


def has_answer(text: str, answers: list[str]) -> bool:
    """DPR-style: some answer occurs as a token sequence of the passage."""
    toks = _normalize_tokens(text)
    for ans in answers:
        a = _normalize_tokens(ans)
        if a and any(toks[i:i + len(a)] == a for i in range(len(toks) - len(a) + 1)):
            return True
    return False


def cmd_qa(args):
    """Answer recall@k of dense vs BM25 on NQ-open test questions answerable from the corpus."""
    import faiss

    from retro.components.retrieval.api import Retriever, retriever_inputs

    faiss.omp_set_num_threads(args.threads)
    questions = _nq()
    texts = [q["question"] for q in questions]
    out = {"bench": "qa", "questions": len(questions), "threads": args.threads}
    for kind in ("dense", "bm25"):
        arts = _full_artifacts(args, kind)
        node = sections(retriever_type=kind)["retriever"]
        if kind == "dense":  # the defaults the build's embed stage ran with
            node["embedder"] = {"type": "hf-mean-pool"}
        spec = type("S", (), {"retriever": type("R", (), {"type": kind})})
        retriever = Retriever.from_artifacts(
            node, {slot: arts[c] for slot, c in retriever_inputs(spec).items()})
        c0 = time.process_time()
        hits = retriever.search(texts, 20)
        seconds = time.process_time() - c0
        found = np.array([[has_answer(p.text, q["answers"]) for p in row[:20]]
                          + [False] * (20 - len(row)) for row, q in zip(hits, questions)])
        out[kind] = {f"recall@{k}": float(found[:, :k].any(1).mean()) for k in (1, 5, 20)}
        out[kind]["queries_per_cpu_s"] = len(texts) / seconds
    emit(args.work, out)


class RssSampler:
    """Peak RSS per process of this process tree (Ray workers included), sampled every 0.2 s."""

    def __init__(self):
        import psutil

        self.root = psutil.Process()
        self.peaks: dict[int, tuple[str, int]] = {}
        self.cpu: dict[int, float] = {}
        self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in [self.root] + self.root.children(recursive=True):
                try:
                    rss = p.memory_info().rss
                    t = p.cpu_times()
                    self.cpu[p.pid] = t.user + t.system
                    name = " ".join(p.cmdline()[:1]) if p.pid != self.root.pid else "driver"
                    if "ray::" in name or "default_worker" in " ".join(p.cmdline()):
                        name = "ray-worker"
                except psutil.Error:
                    continue
                total += rss
                if rss > self.peaks.get(p.pid, ("", 0))[1]:
                    self.peaks[p.pid] = (name, rss)
            self.peak_total = max(self.peak_total, total)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        workers = [rss for name, rss in self.peaks.values() if name == "ray-worker"]
        return {"peak_worker_rss_mb": max(workers, default=0) / 2**20,
                "peak_driver_rss_mb": self.peaks.get(self.root.pid, ("", 0))[1] / 2**20,
                "peak_tree_rss_mb": self.peak_total / 2**20,
                "cpu_s": sum(self.cpu.values())}


def cmd_scale(args):
    """Whole retro-db build (neighbours of train and valid included) at N and 4N documents.
    Wall time includes the local Ray start (a few seconds); CPU seconds sum every process."""
    import shutil

    rows = []  # each size starts its own local Ray, so no worker carries memory across sizes
    for mult in (1, 4):
        work = args.work / f"scale-{mult}x"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        secs = sections(max_documents=args.docs * mult, splits=("train", "valid"),
                        index={"type": "faiss", "factory": "HNSW32,Flat", "ef_search": 64})
        secs["retriever"]["neighbours"] = {"candidates": 50, "k": 2}
        secs["resources"] = {"num_cpus": args.workers}
        with RssSampler() as rss:
            wall, arts, _ = run_spec(work, f"scale-{mult}x", args.workers, **secs)
        rows.append({"docs": args.docs * mult, "wall_s": wall, **rss.summary(),
                     "chunks": arts["chunk-db"].manifest["summary"]["n_chunks"],
                     "stage_s": stage_seconds(arts)})
    emit(args.work, {"bench": "scale", "workers": args.workers, "runs": rows,
                     "time_ratio": rows[1]["wall_s"] / rows[0]["wall_s"],
                     "cpu_ratio": rows[1]["cpu_s"] / rows[0]["cpu_s"],
                     "worker_rss_ratio": rows[1]["peak_worker_rss_mb"]
                     / rows[0]["peak_worker_rss_mb"]})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("command", choices=["build", "embed", "index", "qa", "scale"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/retro-bench"))
    ap.add_argument("--workers", type=int, default=2, help="shards in parallel (build, scale)")
    ap.add_argument("--threads", type=int, default=1, help="torch/faiss threads (embed/index/qa)")
    ap.add_argument("--n", type=int, default=4096, help="chunks (embed)")
    ap.add_argument("--repeats", type=int, default=2, help="timing repeats (embed)")
    ap.add_argument("--max-docs", type=int, default=None,
                    help="articles of the 'full' DB (default: all 4012; small for a smoke run)")
    ap.add_argument("--factory", default=None, help="index of the 'full' DB (smoke runs)")
    ap.add_argument("--docs", type=int, default=100, help="articles at 1x (scale)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.factory:  # smoke runs on a few documents need a smaller index
        FACTORY.clear()
        FACTORY.update(type="faiss", factory=args.factory, nprobe=4)
    globals()[f"cmd_{args.command}"](args)


if __name__ == "__main__":
    main()
