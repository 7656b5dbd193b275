"""bf16 vs fp32 on this CPU (issue 14): Retro training throughput and MiniLM embedding.

Not a test: numbers + commands go to docs/benchmarks.md ("Precision"). Everything is measured
in one process, 1 thread by default, with the variants taking turns step by step (a shared
machine disturbs them alike). Times are the process's CPU time (`time.process_time`: with one
thread, what the step costs a core, whatever else the machine runs; wall time is printed too):
the fastest step of each variant, and the median.

    train   Retro (retro-tiny preset: llama family, 6 layers, CCA at 3 and 6, seq 512, batch 4,
            chunk 64, 2 neighbours of 128, vocab 32000) at decoder widths 256 and 512:
              fp32          no autocast
              bf16          torch.autocast(cpu, bf16): fp32 master weights (what the
                            training loop ran before `training/precision_policy.py`)
              bf16-params   (--bf16-params) bf16 weights for forward/backward, fp32 master copy
                            stepped by AdamW and copied back each step
            FLOPs per step from torch's FlopCounterMode (attention through the math SDPA
            backend), and the step's FLOP rate as a fraction of a bf16 matmul (2048³) measured
            between rounds: "the limit".
    embed   MiniLM-L6 (the default embedder) chunks/s in fp32 vs bf16 autocast on real wiki
            chunks (64 GPT-2 tokens of the featured passages, detokenized, as the embed stage
            does), and recall@10 of a bf16-embedded exact index against the fp32 one (queries
            embedded in the same precision as their index).
    loop    the same Retro step through the product's training loop (`loop.train`), fp32 vs
            its bf16 path (`training/precision_policy.py`: bf16 weight copy, fp32 masters,
            AdamW state and loss), widths 256 and 512, FLOP rate as a fraction of the bf16
            matmul rate measured in the same run. The target's measurement (issue 14).
    curve   the tiny spec's gpt-pretrain loss curve in fp32 vs bf16 (and bf16 twice: identical?)
            through the product's training loop.

Usage:
    .venv/bin/python -m bench.precision train [--widths 256 512] [--rounds 3] [--bf16-params]
    .venv/bin/python -m bench.precision loop [--widths 256 512] [--rounds 3] [--repeats 2]
    .venv/bin/python -m bench.precision embed [--db 4096] [--queries 256] [--rounds 2]
    .venv/bin/python -m bench.precision curve [--steps 120]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import json
import os
import shutil
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
    """FLOP/s of an n³ matmul in `dtype` (best CPU-time of `reps`)."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t = time.process_time()
        torch.mm(a, b)
        times.append(time.process_time() - t)
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

        self.name, self.batch, self.times, self.walls, self.losses = name, batch, [], [], []
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

        t, wall = time.process_time(), time.perf_counter()
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
        dt = time.process_time() - t
        self.times.append(dt)
        self.walls.append(time.perf_counter() - wall)
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
        v.times.clear(), v.walls.clear(), v.losses.clear()
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
                     "step_s_median": statistics.median(v.times), "wall_s_min": min(v.walls),
                     "wall_s_median": statistics.median(v.walls), "tokens_per_s": B * N / t,
                     "gflop_per_step": flops / 1e9, "flop_rate_gflops": flops / t / 1e9,
                     "of_bf16_matmul": flops / t / bf16_mm,
                     "speedup_vs_fp32": min(cases[(width, "fp32")].times) / t,
                     "first_loss": v.losses[0]})
    return {"rows": rows, "bf16_matmul_gflops": bf16_mm / 1e9,
            "fp32_matmul_gflops": fp32_mm / 1e9}


def print_train(res: dict) -> None:
    print(f"{'width':>5} {'variant':12} {'cpu s':>7} {'median':>7} {'wall s':>7} {'tok/s':>7} "
          f"{'x fp32':>6} {'GFLOP':>6} {'GFLOP/s':>8} {'of bf16 mm':>10} {'loss':>7}")
    for r in res["rows"]:
        print(f"{r['width']:5} {r['variant']:12} {r['step_s']:7.3f} {r['step_s_median']:7.3f} "
              f"{r['wall_s_min']:7.3f} "
              f"{r['tokens_per_s']:7.0f} {r['speedup_vs_fp32']:6.2f} {r['gflop_per_step']:6.1f} "
              f"{r['flop_rate_gflops']:8.1f} {r['of_bf16_matmul']:10.2f} {r['first_loss']:7.4f}")
    print(f"matmul 2048³ (CPU time; 1 thread unless --threads): bf16 "
          f"{res['bf16_matmul_gflops']:.0f} GFLOP/s, fp32 {res['fp32_matmul_gflops']:.0f} GFLOP/s")


# ------------------------------------------------------------------------------ loop
def bench_loop(args) -> dict:
    """The product's training loop (`loop.train` in-process: `precision_policy`, fp32 AdamW,
    fp32 loss, the loop's micro-batching and clipping) at the bench dims, fp32 vs bf16 at each
    width, each run `--rounds` + 1 steps (the first is warm-up), the pairs repeated
    `--repeats` times in turn. Step times are the loop's own `cpu_s` / wall per train row."""
    import functools
    import tempfile

    import numpy as np
    import torch

    from retro.components.training.checkpoint import LocalRuntime
    from retro.components.training.config import RunSettings, Schedule, resolve_schedule
    from retro.components.training.data import ArrayNeighbours, NpyRows
    from retro.components.training.loop import TrainJob, train
    from retro.components.training.models import build_fresh

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-precision-loop-"))
    rng = np.random.default_rng(0)
    rows = 4 * B
    np.save(work / "train.npy", rng.integers(0, V, (rows, N + 1)).astype(np.uint16))
    nb = functools.partial(ArrayNeighbours, rng.integers(0, V, (rows, N // M, K, R)))
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, V, (B, N + 1), generator=g)
    flop_batch = {"input_ids": seq[:, :-1], "labels": seq[:, 1:],
                  "neighbours": torch.randint(0, V, (B, N // M, K, R), generator=g)}
    sched = resolve_schedule(Schedule(steps=args.rounds + 1, global_batch=B, lr=1e-4,
                                      warmup=0), N)
    steps: dict = {}
    flops, mm = {}, [matmul_rate(torch.bfloat16)]
    for width in args.widths:
        flops[width] = count_flops(build_retro(width), flop_batch)
    for rep in range(args.repeats):
        for width in args.widths:
            node = {"type": "retro", "preset": "retro-tiny", "retro": True,
                    "overrides": {"d_model": width, "n_heads": width // 64, "max_seq_len": N}}
            for precision in ("fp32", "bf16"):
                name = f"w{width}-{precision}-{rep}"
                job = TrainJob(name=name, seed=0, out_dir=str(work / name), schedule=sched,
                               model=functools.partial(build_fresh, node, V, M, retro=True),
                               train_data=NpyRows(str(work / "train.npy"), N, neighbours=nb),
                               val_data=None,
                               run=RunSettings(micro_batch=B, eval_batches=0,
                                               checkpoint_interval=10_000, precision=precision))
                summary = train(job, LocalRuntime(work / f"{name}-ckpt"))
                got = [json.loads(x) for x in job.metrics_file.read_text().splitlines()]
                got = [r for r in got if r["kind"] == "train"][1:]      # drop the warm-up
                assert summary["precision"] == precision, summary
                steps.setdefault((width, precision), []).extend(got)
                shutil.rmtree(work / name, ignore_errors=True)
                shutil.rmtree(work / f"{name}-ckpt", ignore_errors=True)
            mm.append(matmul_rate(torch.bfloat16))
    bf16_mm = max(mm)
    out = []
    for (width, precision), got in steps.items():
        cpu = min(r["cpu_s"] for r in got)
        fp32 = min(r["cpu_s"] for r in steps[(width, "fp32")])
        out.append({"width": width, "precision": precision, "step_cpu_s": cpu,
                    "step_cpu_s_median": statistics.median(r["cpu_s"] for r in got),
                    "step_wall_s_median": statistics.median(B * N / r["tokens_per_s"]
                                                            for r in got),
                    "tokens_per_s": B * N / cpu, "speedup_vs_fp32": fp32 / cpu,
                    "gflop_per_step": flops[width] / 1e9,
                    "flop_rate_gflops": flops[width] / cpu / 1e9,
                    "of_bf16_matmul": flops[width] / cpu / bf16_mm,
                    "first_loss": got[0]["loss"]})
    shutil.rmtree(work, ignore_errors=True)
    return {"rows": out, "bf16_matmul_gflops": bf16_mm / 1e9, "steps_per_run": args.rounds,
            "repeats": args.repeats}


def print_loop(res: dict) -> None:
    print(f"{'width':>5} {'prec':5} {'cpu s':>7} {'median':>7} {'wall med':>8} {'tok/s':>7} "
          f"{'x fp32':>6} {'GFLOP':>6} {'GFLOP/s':>8} {'of bf16 mm':>10} {'loss':>7}")
    for r in sorted(res["rows"], key=lambda r: (r["width"], r["precision"] != "fp32")):
        print(f"{r['width']:5} {r['precision']:5} {r['step_cpu_s']:7.3f} "
              f"{r['step_cpu_s_median']:7.3f} {r['step_wall_s_median']:8.3f} "
              f"{r['tokens_per_s']:7.0f} {r['speedup_vs_fp32']:6.2f} {r['gflop_per_step']:6.1f} "
              f"{r['flop_rate_gflops']:8.1f} {r['of_bf16_matmul']:10.2f} {r['first_loss']:7.4f}")
    print(f"bf16 matmul 2048³ (CPU time, best between runs): {res['bf16_matmul_gflops']:.0f} "
          f"GFLOP/s; {res['repeats']} x {res['steps_per_run']} timed steps per variant")


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
                t = time.process_time()
                out = e.embed(db[a:a + window])
                times[p].append((time.process_time() - t, len(out)))
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


# ------------------------------------------------------------------------------ curve
def bench_curve(args) -> dict:
    """The tiny spec's gpt-pretrain (retro-tiny preset at d_model 128, seq 256, batch 8, 120
    steps, lr 1e-3 -> 1e-4, warmup 10, eval every 40 on 2 batches) in fp32, bf16 and bf16 again,
    through the product's training loop (in-process, 1 thread)."""
    import functools
    import tempfile

    import torch

    from retro.components.training.config import RunSettings, Schedule, resolve_schedule
    from retro.components.training.data import NpyRows
    from retro.components.training.launcher import launch
    from retro.components.training.loop import TrainJob
    from retro.components.training.models import build_fresh
    from tests.training.helpers import wiki_rows

    torch.set_num_threads(args.threads)
    vocab, seq = 4096, 256
    work = Path(tempfile.mkdtemp(prefix="bench-precision-"))
    train, valid = wiki_rows(DATA, work, seq, args.passages, vocab=vocab)
    node = {"type": "retro", "preset": "retro-tiny", "retro": False,
            "overrides": {"d_model": 128}}
    sched = resolve_schedule(Schedule(steps=args.steps, global_batch=8, lr=1e-3, min_lr=1e-4,
                                      warmup=10), seq)
    runs = {}
    for name, precision in (("fp32", "fp32"), ("bf16", "bf16"), ("bf16-again", "bf16")):
        job = TrainJob(name=name, seed=1234, out_dir=str(work / name), schedule=sched,
                       model=functools.partial(build_fresh, node, vocab, 64, retro=False),
                       train_data=NpyRows(str(train), seq), val_data=NpyRows(str(valid), seq),
                       run=RunSettings(micro_batch=8, eval_interval=40, eval_batches=2,
                                       checkpoint_interval=10_000, precision=precision))
        t = time.process_time()
        summary = launch(job, num_workers=1, storage=work / f"{name}-ckpt", use_ray=False)
        rows = [json.loads(x) for x in job.metrics_file.read_text().splitlines()]
        runs[name] = {"cpu_s": time.process_time() - t, "precision": summary["precision"],
                      "train_loss": [r["loss"] for r in rows if r["kind"] == "train"],
                      "val_loss": [r["val_loss"] for r in rows if r["kind"] == "eval"],
                      "time_s": summary.get("time_s")}
    a, b = runs["bf16"], runs["fp32"]
    return {"runs": runs, "final_train_rel_diff": a["train_loss"][-1] / b["train_loss"][-1] - 1,
            "final_val_rel_diff": a["val_loss"][-1] / b["val_loss"][-1] - 1,
            "max_train_rel_diff": max(abs(x / y - 1) for x, y in
                                      zip(a["train_loss"], b["train_loss"])),
            "bf16_runs_identical": runs["bf16"]["train_loss"] == runs["bf16-again"]["train_loss"]
            and runs["bf16"]["val_loss"] == runs["bf16-again"]["val_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["train", "loop", "embed", "curve"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bf16-params", action="store_true")
    ap.add_argument("--repeats", type=int, default=2, help="loop: fp32/bf16 pairs in turn")
    ap.add_argument("--db", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--passages", type=int, default=1500)
    ap.add_argument("--json", type=Path, help="append the result as a JSON line here")
    args = ap.parse_args()
    from retro.components.precision import hardware_text

    load0 = os.getloadavg()
    res = {"train": bench_train, "loop": bench_loop, "embed": bench_embed,
           "curve": bench_curve}[args.what](args)
    res["env"] = {"threads": args.threads, "hardware": hardware_text("cpu"),
                  "load_avg_start_end": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
                  "rounds": args.rounds}
    if args.what == "train":
        print_train(res)
    elif args.what == "loop":
        print_loop(res)
    elif args.what == "curve":
        for name, r in res["runs"].items():
            print(f"{name:11} {r['precision']} cpu {r['cpu_s']:.0f}s train loss "
                  f"{r['train_loss'][0]:.4f} -> {r['train_loss'][-1]:.4f}, val "
                  + " ".join(f"{v:.4f}" for v in r["val_loss"]))
        print({k: v for k, v in res.items() if k != "runs"})
    else:
        print(json.dumps(res, indent=1))
    print(f"hardware {res['env']['hardware']}; load average start/end "
          f"{res['env']['load_avg_start_end']}")
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps({"what": args.what, **res}) + "\n")


if __name__ == "__main__":
    main()
