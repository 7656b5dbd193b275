"""Training throughput of the loop (GPT vs Retro, tokens/s) and Ray Train's fixed cost per fit.

Usage: .venv/bin/python bench/training_throughput.py [--preset retro-tiny] [--steps 8]
          [--seq 256] [--batch 8] [--vocab 4096] [--threads 1] [--ray]

In-process: `steps` optimizer steps of `batch` x `seq` random tokens on the preset's plain
decoder and on its Retro model (k=2 neighbours of 2m tokens per chunk, m=64), AdamW, fp32 CPU;
the first step (warm-up) is excluded. `--ray` also times a 1-worker and a 2-worker Ray Train fit
of a 2-step job, minus its in-process time: the fixed cost per fit (actor start-up, torch
import, process group). Prints one line per measurement and the load average.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="retro-tiny")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ray", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from retro.components.training.checkpoint import LocalRuntime
    from retro.components.training.config import RunSettings, Schedule, resolve
    from retro.components.training.data import ArrayNeighbours, NpyRows
    from retro.components.training.launcher import launch
    from retro.components.training.loop import TrainJob, train
    from retro.components.training.models import build_fresh

    tmp = Path(tempfile.mkdtemp(prefix="retro-bench-train-"))
    rng = np.random.default_rng(0)
    n, m, k = args.batch * (args.steps + 1), 64, 2
    np.save(tmp / "rows.npy", rng.integers(0, args.vocab, (n, args.seq)).astype(np.int32))
    neighbours = rng.integers(0, args.vocab, (n, args.seq // m, k, 2 * m))
    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}")

    def make_job(name, retro, steps, out):
        node = {"type": "retro", "preset": args.preset, "retro": retro}
        nb = functools.partial(ArrayNeighbours, neighbours) if retro else None
        return TrainJob(
            name=name, seed=0, out_dir=str(out),
            model=functools.partial(build_fresh, node, args.vocab, m, retro=retro),
            train_data=NpyRows(str(tmp / "rows.npy"), args.seq, neighbours=nb), val_data=None,
            schedule=resolve(Schedule(steps=steps, global_batch=args.batch, lr=1e-4), args.seq),
            run=RunSettings(micro_batch=args.batch, eval_batches=0,
                            checkpoint_interval=10**6))

    for name, retro in (("gpt", False), ("retro", True)):
        job = make_job(name, retro, args.steps, tmp / name)
        train(job, LocalRuntime(tmp / f"{name}-ckpt"))
        rows = [__import__("json").loads(x) for x in job.metrics_file.read_text().splitlines()]
        tps = [r["tokens_per_s"] for r in rows if r["kind"] == "train"][1:]
        print(f"{args.preset} {name:5s} in-process: {np.median(tps):8.0f} tokens/s "
              f"(median of {len(tps)} steps, batch {args.batch} x {args.seq})")

    if args.ray:
        from retro.platform.scheduler import connect_ray

        connect_ray(num_cpus=2)
        for workers in (1, 2):
            local = make_job("gpt", False, 2, tmp / f"l{workers}")
            t0 = time.perf_counter()
            train(local, LocalRuntime(tmp / f"l{workers}-ckpt"))
            inproc = time.perf_counter() - t0
            job = make_job("gpt", False, 2, tmp / f"r{workers}")
            t0 = time.perf_counter()
            launch(job, num_workers=workers, storage=tmp / f"r{workers}-work")
            wall = time.perf_counter() - t0
            print(f"ray train fit, {workers} worker(s): {wall:.1f} s for a 2-step job "
                  f"({inproc:.1f} s in-process): fixed cost {wall - inproc:.1f} s")


if __name__ == "__main__":
    main()
