"""The memory planner's estimate vs measured peak memory of real training steps on CPU.

For each configuration: build the model, AdamW, and run three optimizer steps exactly as the
training loop does (`loop._loss_sum`, fp32, no activation checkpointing: the loop has none
yet), in fresh subprocesses: one worker, or two gloo workers under the loop's FSDP2 wrapping
(`loop._wrap`; the worst rank's peak). Measured: the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs after the data and imports are in place) minus the RSS at that point.
Estimated: `memory.estimate_memory(model_shape(meta model), workload).total`.

    .venv/bin/python bench/memory_planner.py            # every configuration
    .venv/bin/python bench/memory_planner.py --only gpt-d512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CONFIGS = {
    # name: (model overrides, retro, seq, micro_batch, neighbours)
    "gpt-d512": ({"n_layers": 4, "d_model": 512, "n_heads": 8, "vocab_size": 8192}, False,
                 512, 4, 0),
    "gpt-d256-seq1024": ({"n_layers": 6, "d_model": 256, "n_heads": 4, "vocab_size": 16384},
                         False, 1024, 4, 0),
    "retro-d256-k2": ({"n_layers": 6, "d_model": 256, "n_heads": 4, "vocab_size": 8192}, True,
                      512, 4, 2),
    "retro-d384-k4": ({"n_layers": 6, "d_model": 384, "n_heads": 6, "vocab_size": 8192}, True,
                      256, 4, 4),
    # FSDP2 on 2 gloo workers (per-rank peak): sharded state, unit gathers, the root unit
    "fsdp2-gpt-d512": ({"n_layers": 6, "d_model": 512, "n_heads": 8, "vocab_size": 16384},
                       False, 512, 2, 0),
    "fsdp2-retro-d384-k2": ({"n_layers": 6, "d_model": 384, "n_heads": 6,
                             "vocab_size": 8192}, True, 512, 2, 2),
}
WORKERS = {name: 2 if name.startswith("fsdp2") else 1 for name in CONFIGS}
CHUNK = 64


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def measure(name: str) -> dict:
    """Runs in the child: estimate, then measure."""
    import torch

    from retro.components.models.retro.build import build_model
    from retro.components.training.loop import _loss_sum
    from retro.components.training.memory import (Workload, estimate_memory, model_shape,
                                                  retrieved_length)
    from retro.platform.registry import registry

    torch.set_num_threads(1)
    overrides, retro, seq, mb, k = CONFIGS[name]
    registry.load_plugins()
    node = {"type": "retro", "preset": "retro-tiny", "overrides": overrides, "retro": retro,
            "freeze": "unfrozen"}
    cfg = registry.get("model", "retro").node_model().model_validate(node)
    vocab = overrides["vocab_size"]
    shape = model_shape(build_model(cfg, vocab, CHUNK, device="meta"))
    world = WORKERS[name]
    work = Workload(seq=seq, micro_batch=mb, compute_bytes=4, workers=world, fsdp=world > 1,
                    neighbours=k, retrieved=retrieved_length(CHUNK))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    est = estimate_memory(shape, work)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, vocab, (mb, seq), generator=g),
             "labels": torch.randint(0, vocab, (mb, seq), generator=g),
             "loss_mask": torch.ones(mb, seq)}
    if k:
        batch["neighbours"] = torch.randint(0, vocab, (mb, seq // CHUNK, k, 2 * CHUNK),
                                            generator=g)
    base = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:   # resets VmHWM to the current RSS
        fh.write("5")
    torch.manual_seed(0)
    model = build_model(cfg, vocab, CHUNK)
    model.train()
    if world > 1:
        from retro.components.training.loop import _wrap

        model = _wrap(model, True, world, torch.device("cpu"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=False)
    for _ in range(3):
        _loss_sum(model, batch, torch.device("cpu")).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = (_rss_kib("VmHWM") - base) * 1024
    if world > 1:
        peaks = [torch.tensor(float(peak))]
        dist.all_reduce(peaks[0], op=dist.ReduceOp.MAX)   # the worst rank
        peak = float(peaks[0])
        dist.destroy_process_group()
    return {"config": name, "workers": world, "params": shape.params, "seq": seq, "micro_batch": mb,
            "neighbours": k, "measured_mib": peak / 2**20, "estimated_mib": est.total / 2**20,
            "estimate_parts_mib": {p: v * 1024 for p, v in est.as_gib().items()},
            "ratio": est.total / peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", action="append")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    rows = []
    for name in args.only or CONFIGS:
        world = WORKERS[name]
        port = str(29500 + os.getpid() % 1000)
        procs = [subprocess.Popen([sys.executable, __file__, "--child", name], text=True,
                                  stdout=subprocess.PIPE,
                                  env={**env, "RANK": str(r), "WORLD_SIZE": str(world),
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
                 for r in range(world)]
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit(f"{name}: a worker failed")
        rows.append(json.loads(outs[0].strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{name:20s} x{r['workers']} params {r['params'] / 1e6:6.2f}M  seq {r['seq']:5d} mb "
              f"{r['micro_batch']} k {r['neighbours']}  measured {r['measured_mib']:7.1f} MiB"
              f"  estimated {r['estimated_mib']:7.1f} MiB  estimate/measured "
              f"{r['ratio']:.2f}", flush=True)
        print("    parts (MiB): " + ", ".join(f"{k} {v:.1f}" for k, v in
                                           r["estimate_parts_mib"].items()), flush=True)
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"worst deviation {worst:.1%} (target <= 25%)")


if __name__ == "__main__":
    main()
