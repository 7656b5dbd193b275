"""Joint training's index refresh and staleness probe on this CPU (issue 17): what they cost.

Not a test: numbers + commands go to docs/benchmarks.md ("Joint: index refresh and staleness").
MiniLM (the default embedder) on N wiki featured passages, NQ-open questions as probe queries.

    refresh    seconds (and passages/s) of one refresh by the Ray actor (1 torch thread) at
               precision auto (bf16 here) and fp32; the digest's cost (hashing the encoder).
    overlap    a training-like step (MiniLM query-tower forward + backward on 8 questions,
               1 thread) timed alone and while the actor refreshes: the slowdown the asynchronous
               refresh costs the trainer on a shared 2-core machine.
    staleness  the document tower perturbed by seeded Gaussian noise of several std's: staleness
               recall@10 of the bf16 (auto) index by the probe (64 questions, P probe documents,
               fresh embeddings from `IndexRefresher.embed`, the refresh's own path) vs the same
               metric over the whole corpus, and the seconds per check; at noise 0 also the
               mismatch to avoid (fp32 tower embeddings against the bf16 index).

Usage:
    .venv/bin/python -m bench.joint_refresh [--passages 1000] [--probe-docs 256] [--fp32]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                   "TOKENIZERS_PARALLELISM": "false"})
DATA = Path(os.environ.get("RETRO_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def passages(n: int) -> list[str]:
    out = []
    with gzip.open(DATA / "wiki_featured_passages" / "passages.part-00.jsonl.gz", "rt") as fh:
        for line in fh:
            row = json.loads(line)
            out.append(f"{row['title']}. {row['text']}")
            if len(out) == n:
                break
    return out


def questions(n: int) -> list[str]:
    with gzip.open(DATA / "nq_open_oracle" / "questions.jsonl.gz", "rt") as fh:
        rows = [json.loads(line) for _, line in zip(range(n), fh)]
    return [r.get("question") or r.get("text") for r in rows]


def perturbed(state: dict, std: float, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {k: v + std * torch.randn(v.shape, generator=g) if v.is_floating_point() and std
            else v for k, v in state.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passages", type=int, default=1000)
    ap.add_argument("--probe-docs", type=int, nargs="+", default=[256])
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.01, 0.02])
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--fp32", action="store_true", help="also time an fp32 refresh")
    args = ap.parse_args()

    import torch

    from retro.components.joint.refresh import IndexRefresher
    from retro.components.joint.staleness import StalenessProbe, staleness_recall
    from retro.components.joint.refresh_config import RefreshConfig
    from retro.components.radit.query_encoder import QueryEncoder
    from retro.components.retrieval.embedders import default_model_path
    from retro.platform.scheduler import connect_ray

    torch.set_num_threads(1)
    print("uptime:", os.popen("uptime").read().strip(), flush=True)
    texts, qs = passages(args.passages), questions(64)
    node = {"type": "hf-mean-pool", "max_length": args.max_length, "batch_size": 64}
    q_tower = QueryEncoder(node)
    base = {k: v.clone() for k, v in q_tower.model.state_dict().items()}
    connect_ray(num_cpus=2)
    root = Path(tempfile.mkdtemp(prefix="joint-refresh-"))
    out: dict = {"passages": len(texts), "max_length": args.max_length}

    def refresher(precision: str) -> IndexRefresher:
        return IndexRefresher(root / precision, texts, "bench", default_model_path(),
                              max_length=args.max_length, batch_size=64, precision=precision,
                              backend="ray", threads=1, shards=4)

    # -- refresh --------------------------------------------------------------------------
    r = refresher("auto")
    t0 = time.perf_counter()
    r.digest(base)
    out["digest_seconds"] = round(time.perf_counter() - t0, 3)
    for name, rr in (("auto", r), *((("fp32", refresher("fp32")),) if args.fp32 else ())):
        snap = rr.build_now(base, 0)
        out[f"refresh_{name}"] = {"seconds": snap.meta["seconds"],
                                  "passages_per_s": round(len(texts) / snap.meta["seconds"], 1),
                                  "precision": snap.meta["precision"],
                                  "index_seconds": snap.meta["index_seconds"]}
        print(name, out[f"refresh_{name}"], flush=True)
        if name == "auto":
            stale = snap
        else:
            rr.close()

    # -- overlap: trainer step alone vs during a refresh ----------------------------------
    opt = torch.optim.SGD(q_tower.parameters(), lr=0.0)      # lr 0: the tower stays `base`
    batch = qs[:8]

    def step() -> float:
        t0 = time.perf_counter()
        loss = q_tower(batch).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    q_tower.train()
    alone = [step() for _ in range(10)]
    r.submit(perturbed(base, 1e-3, seed=9), 1)
    during, snap = [], None
    while snap is None:
        during.append(step())
        snap = r.poll()
    r.close()
    alone += [step() for _ in range(10)]
    out["overlap"] = {"step_alone_s": round(float(np.median(alone)), 4),
                      "step_during_refresh_s": round(float(np.median(during)), 4),
                      "steps_during_refresh": len(during),
                      "refresh_seconds": snap.meta["seconds"]}
    print("overlap", out["overlap"], flush=True)
    q_tower.train(False)

    # -- staleness: probe vs whole corpus, cost per check ---------------------------------
    q = q_tower.encode(qs)          # the query tower's fp32 path (unchanged: lr 0)
    rows = []
    for std in args.noise:
        state = perturbed(base, std)
        t0 = time.perf_counter()
        fresh_all = r.embed(state, texts)          # what a refresh would write
        row = {"noise_std": std, "full_recall": round(staleness_recall(stale, fresh_all, q, 10), 4),
               "full_seconds": round(time.perf_counter() - t0, 2)}
        for p in args.probe_docs:
            cfg = RefreshConfig(probe_queries=64, probe_docs=p, probe_k=10)
            probe = StalenessProbe.build(qs, texts, cfg, seed=0)
            row[f"probe{p}_recall"] = round(probe.measure(q_tower.encode,
                                                          lambda t: r.embed(state, t), stale), 4)
            row[f"probe{p}_seconds"] = round(probe.last_seconds, 2)
        if std == 0:
            # the mismatch to avoid: fp32 tower embeddings against the bf16 (auto) index
            q_tower.model.load_state_dict(state)
            row["full_recall_fp32_fresh_vs_bf16_index"] = round(staleness_recall(
                stale, q_tower.encode(texts, batch_size=64), q, 10), 4)
        rows.append(row)
        print(row, flush=True)
    out["staleness"] = rows
    print(json.dumps(out))


if __name__ == "__main__":
    main()
