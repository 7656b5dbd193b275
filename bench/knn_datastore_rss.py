"""Peak RSS of the `knn-datastore` stage as its corpus grows (issue 16 target: flat, <= 1.2x at 4x).

Each size runs in a fresh subprocess (ru_maxrss is a process high-water mark): hand-built train
sequences of random tokens, a random GPT-2 (`--width`, 2 layers, GPT-2 vocabulary), the stage
called inline (one shard worker, no Ray). Prints one JSON line per size and the ratio.

    .venv/bin/python bench/knn_datastore_rss.py --docs 200 800 --width 256
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(n_docs: int, width: int, seq_length: int) -> dict:
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from retro.components.knnlm.datastore import knn_datastore
    from tests.evaluation.helpers import as_artifact, stage_ctx
    from tests.knnlm.helpers import db_artifacts

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from tests.conftest import SHARED_DATA

    tmp = Path(tempfile.mkdtemp(prefix="knn-rss-"))
    tok = GPT2TokenizerFast.from_pretrained(str(SHARED_DATA / "tokenizer_gpt2"))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=width, n_layer=2, n_head=4,
                               n_positions=seq_length)).save_pretrained(tmp / "lm")
    tok.save_pretrained(tmp / "lm")
    rng = np.random.default_rng(0)
    docs = [rng.integers(100, 50000, size=int(rng.integers(200, 600))).tolist()
            for _ in range(n_docs)]
    arts = _train_only(tmp / "db", docs, seq_length, db_artifacts)
    model = as_artifact(tmp / "lm")
    ctx = stage_ctx(tmp, "ds", {"key": "ffn_input", "fp16": False, "precision": "fp32"},
                    {"model": model, "sequences": arts["sequences-train"], "tokens": arts["tokens"],
                     "chunk_db": arts["chunk_db"], "tokenizer": model})
    t0 = time.time()
    summary = knn_datastore(ctx)
    return {"docs": n_docs, "rows": summary["n"], "bytes": summary["bytes"],
            "seconds": round(time.time() - t0, 1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _train_only(path: Path, docs: list, seq_length: int, build) -> dict:
    # two tiny valid documents so the helper has a valid split to lay out
    return build(path, docs + [[101] * (seq_length + 1)] * 2, [0] * len(docs) + [1, 1], seq_length)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, nargs="+", default=[200, 800])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.width, args.seq_length)))
        return
    rows = []
    for n in args.docs:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--width",
                              str(args.width), "--seq-length", str(args.seq_length)],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"rows_ratio": rows[-1]["rows"] / rows[0]["rows"],
                      "peak_rss_ratio": rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]}))


if __name__ == "__main__":
    main()
