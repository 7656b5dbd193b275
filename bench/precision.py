"""bf16 vs fp32 on this CPU (issue 14): Retro training throughput and MiniLM embedding.

Not a test: numbers + commands go to docs/benchmarks.md ("Precision"). Everything is measured
in one process, 1 thread by default, with the variants taking turns step by step (a shared
machine disturbs them alike); the fastest step of each is reported (the median too).

    train   Retro (retro-tiny preset: llama family, 6 layers, CCA at 3 and 6, seq 512, batch 4,
            chunk 64, 2 neighbours of 128, vocab 32000) at decoder widths 256 and 512:
              fp32          no autocast
              bf16          torch.autocast(cpu, bf16): fp32 master weights, what the
                            training loop runs (components/precision.py)
              bf16-params   (--bf16-params) bf16 weights for forward/backward, fp32 master copy
                            stepped by AdamW and copied back each step
            FLOPs per step from torch's FlopCounterMode (attention through the math SDPA
            backend), and the step's FLOP rate as a fraction of a bf16 matmul (2048³) measured
            between rounds: "the limit".
    embed   MiniLM-L6 (the default embedder) chunks/s in fp32 vs bf16 autocast on real wiki
            chunks (64 GPT-2 tokens of the featured passages, detokenized, as the embed stage
            does), and recall@10 of a bf16-embedded exact index against the fp32 one (queries
            embedded in the same precision as their index).

Usage:
    .venv/bin/python bench/precision.py train [--widths 256 512] [--rounds 3] [--bf16-params]
    .venv/bin/python bench/precision.py embed [--db 4096] [--queries 256] [--rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import json
import os
import statistics
import time
from pathlib import Path

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

DATA = Path(os.environ.get("RETRO_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
B, N, M, K, R, V = 4, 512, 64, 2, 128, 32000


# ------------------------------------------------------------------------------ train
def build_retro(width: int):
    from retro.components.models.retro import build_model
    from retro.platform.registry import registry

    registry.load_plugins()
    node = registry.get("model", "retro").node_model().model_validate({
        "type": "retro", "preset": "retro-tiny", "retro": True,
        "overrides": {"d_model": width, "n_heads": width // 64, "max_seq_len": N}})
    import torch

    torch.manual_seed(0)
    return build_model(node, V, M).train()


def matmul_rate(dtype, n: int = 2048, reps: int = 4) -> float:
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times)


def count_flops(model, batch) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


class Variant:
    """One way to run a training step (fwd + bwd + AdamW) of its own copy of the model."""

    def __init__(self, name: str, model, batch):
        import torch

        from retro.components.precision import autocast

        self.name, self.batch, self.times, self.losses = name, batch, [], []
        self.model = copy.deepcopy(model)
        self.ctx = (lambda: autocast("bf16", "cpu")) if name == "bf16" else contextlib.nullcontext
        self.master = None
        if name == "bf16-params":            # bf16 working weights, fp32 master copy
            self.master = [p.detach().clone().float().requires_grad_(p.requires_grad)
                           for p in self.model.parameters()]
            self.model.to(torch.bfloat16)
            params = self.master
        else:
            params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, foreach=True)

    def step(self) -> float:
        import torch

        t = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with self.ctx():
            out = self.model(**self.batch)
            loss = out.loss.float()
        loss.backward()
        if self.master is not None:
            for w, p in zip(self.master, self.model.parameters()):
                w.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        self.opt.step()
        if self.master is not None:
            with torch.no_grad():
                for w, p in zip(self.master, self.model.parameters()):
                    p.copy_(w)
        dt = time.perf_counter() - t
        self.times.append(dt)
        self.losses.append(float(loss.detach()))
        return dt


def bench_train(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, V, (B, N + 1), generator=g)
    batch = {"input_ids": seq[:, :-1], "labels": seq[:, 1:],
             "neighbours": torch.randint(0, V, (B, N // M, K, R), generator=g)}
    names = ["fp32", "bf16"] + (["bf16-params"] if args.bf16_params else [])
    cases = {}
    for width in args.widths:
        model = build_retro(width)
        flops = count_flops(model, batch)
        for name in names:
            cases[(width, name)] = Variant(name, model, batch)
        cases[(width, "fp32")].flops = flops
        del model
    for v in cases.values():                # warm-up (oneDNN primitive caches, allocator)
        v.step()
        v.times.clear(), v.losses.clear()
    bf16_rates, fp32_rates = [matmul_rate(torch.bfloat16)], [matmul_rate(torch.float32)]
    for _ in range(args.rounds):
        for v in cases.values():
            v.step()
        bf16_rates.append(matmul_rate(torch.bfloat16))
        fp32_rates.append(matmul_rate(torch.float32))
    bf16_mm, fp32_mm = max(bf16_rates), max(fp32_rates)
    rows = []
    for (width, name), v in cases.items():
        flops = cases[(width, "fp32")].flops
        t = min(v.times)
        rows.append({"width": width, "variant": name, "step_s": t,
                     "step_s_median": statistics.median(v.times), "tokens_per_s": B * N / t,
                     "gflop_per_step": flops / 1e9, "flop_rate_gflops": flops / t / 1e9,
                     "of_bf16_matmul": flops / t / bf16_mm,
                     "speedup_vs_fp32": min(cases[(width, "fp32")].times) / t,
                     "first_loss": v.losses[0]})
    return {"rows": rows, "bf16_matmul_gflops": bf16_mm / 1e9,
            "fp32_matmul_gflops": fp32_mm / 1e9}


def print_train(res: dict) -> None:
    print(f"{'width':>5} {'variant':12} {'step s':>7} {'median':>7} {'tok/s':>7} "
          f"{'x fp32':>6} {'GFLOP':>6} {'GFLOP/s':>8} {'of bf16 mm':>10} {'loss':>7}")
    for r in res["rows"]:
        print(f"{r['width']:5} {r['variant']:12} {r['step_s']:7.3f} {r['step_s_median']:7.3f} "
              f"{r['tokens_per_s']:7.0f} {r['speedup_vs_fp32']:6.2f} {r['gflop_per_step']:6.1f} "
              f"{r['flop_rate_gflops']:8.1f} {r['of_bf16_matmul']:10.2f} {r['first_loss']:7.4f}")
    print(f"matmul 2048³ (1 thread unless --threads): bf16 {res['bf16_matmul_gflops']:.0f} "
          f"GFLOP/s, fp32 {res['fp32_matmul_gflops']:.0f} GFLOP/s")


# ------------------------------------------------------------------------------ embed
def wiki_chunks(n: int, skip: int = 0) -> list[str]:
    """`n` real DB-style chunks: 64 GPT-2 tokens of consecutive featured passages, decoded."""
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(DATA / "tokenizer_gpt2"))
    chunks, seen = [], 0
    with gzip.open(DATA / "wiki_featured_passages" / "passages.part-00.jsonl.gz", "rt") as fh:
        for line in fh:
            ids = tok.encode(json.loads(line)["text"])
            for a in range(0, len(ids), M):
                seen += 1
                if seen > skip:
                    chunks.append(tok.decode(ids[a:a + M]))
                if len(chunks) == n:
                    return chunks
    return chunks


def bench_embed(args) -> dict:
    import numpy as np
    import torch

    from retro.components.retrieval.embedders import HFMeanPoolEmbedder

    torch.set_num_threads(args.threads)
    db = wiki_chunks(args.db)
    queries = wiki_chunks(args.queries, skip=args.db + 10_000)   # other passages
    emb = {p: HFMeanPoolEmbedder(HFMeanPoolEmbedder.Config(precision=p))
           for p in ("fp32", "bf16")}
    for e in emb.values():
        e.load()
        e.embed(db[:256])                                      # warm-up
    times = {p: [] for p in emb}
    vecs: dict[str, list] = {p: [] for p in emb}
    window = emb["fp32"].window
    for r in range(args.rounds):
        for a in range(0, len(db), window):                    # take turns window by window
            for p, e in emb.items():
                t = time.perf_counter()
                out = e.embed(db[a:a + window])
                times[p].append((time.perf_counter() - t, len(out)))
                if r == 0:
                    vecs[p].append(out)
    rate = {p: sum(n for _, n in ts) / sum(t for t, _ in ts) for p, ts in times.items()}
    D = {p: np.concatenate(v) for p, v in vecs.items()}
    Q = {p: e.embed(queries) for p, e in emb.items()}
    top = {p: np.argsort(-(Q[p] @ D[p].T), axis=1)[:, :10] for p in emb}
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top["bf16"], top["fp32"])]))
    cos = float(np.mean(np.sum(D["bf16"] * D["fp32"], axis=1)))
    return {"db_chunks": len(db), "queries": len(queries), "chunks_per_s": rate,
            "speedup": rate["bf16"] / rate["fp32"], "recall_at_10_bf16_vs_fp32": recall,
            "mean_cosine_bf16_fp32": cos, "resolved": {p: e.precision for p, e in emb.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["train", "embed"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bf16-params", action="store_true")
    ap.add_argument("--db", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--json", type=Path, help="append the result as a JSON line here")
    args = ap.parse_args()
    from retro.components.precision import hardware_text

    load0 = os.getloadavg()
    res = bench_train(args) if args.what == "train" else bench_embed(args)
    res["env"] = {"threads": args.threads, "hardware": hardware_text("cpu"),
                  "load_avg_start_end": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
                  "rounds": args.rounds}
    if args.what == "train":
        print_train(res)
    else:
        print(json.dumps({k: v for k, v in res.items()}, indent=1))
    print(f"hardware {res['env']['hardware']}; load average start/end "
          f"{res['env']['load_avg_start_end']}")
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps({"what": args.what, **res}) + "\n")


if __name__ == "__main__":
    main()
