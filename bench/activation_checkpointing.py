"""Activation checkpointing on a small Retro model on CPU (issue 15 targets: activation memory
at seq 2,048 down >= 3x, step time up <= 40%).

Model: the retro-tiny preset (llama family, 6 layers x 256, CCA at 3 and 6, 2 encoder layers)
at seq 2,048, micro-batch 1, 2 neighbours of 128 tokens per 64-token chunk, vocab 4,096, fp32.
Each setting runs in a fresh subprocess, as bench/memory_planner.py measures: build, AdamW,
`activation_checkpointing.apply_activation_checkpointing` (what the loop calls), one warm-up
step (allocates AdamW's state), gradients kept allocated (`zero_grad(set_to_none=False)`), then
VmHWM is reset (/proc/self/clear_refs) and `--steps` steps run through `loop._loss_sum`.
Activation memory = peak RSS over those steps - RSS before them (weights, gradients and AdamW
state are resident by then). glibc is told to mmap every allocation above 64 KiB
(MALLOC_MMAP_THRESHOLD_), so freed activations leave the RSS and each step's peak is its own.
Step time = the fastest step's CPU time (1 thread; the machine is shared). The planner's
activation estimate (memory.estimate_memory) is printed beside it.

    .venv/bin/python bench/activation_checkpointing.py [--steps 3] [--settings false true 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SEQ, MB, K, CHUNK, VOCAB = 2048, 1, 2, 64, 4096
NODE = {"type": "retro", "preset": "retro-tiny", "retro": True, "freeze": "unfrozen",
        "overrides": {"max_seq_len": SEQ, "vocab_size": VOCAB}}


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def measure(setting, steps: int) -> dict:
    """Runs in the child."""
    import torch

    from retro.components.models.retro.build import build_model
    from retro.components.training.activation_checkpointing import (
        apply_activation_checkpointing)
    from retro.components.training.loop import _loss_sum
    from retro.components.training.memory import (Workload, checkpoint_every, estimate_memory,
                                                  model_shape, retrieved_length)
    from retro.platform.registry import registry

    torch.set_num_threads(1)
    registry.load_plugins()
    cfg = registry.get("model", "retro").node_model().model_validate(NODE)
    every = checkpoint_every(setting)
    shape = model_shape(build_model(cfg, VOCAB, CHUNK, device="meta"))
    est = estimate_memory(shape, Workload(seq=SEQ, micro_batch=MB, compute_bytes=4,
                                          checkpoint_every=every, neighbours=K,
                                          retrieved=retrieved_length(CHUNK)))
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, VOCAB, (MB, SEQ), generator=g),
             "labels": torch.randint(0, VOCAB, (MB, SEQ), generator=g),
             "loss_mask": torch.ones(MB, SEQ),
             "neighbours": torch.randint(0, VOCAB, (MB, SEQ // CHUNK, K, 2 * CHUNK),
                                         generator=g)}
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB, CHUNK).train()
    apply_activation_checkpointing(model, setting)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cpu = torch.device("cpu")

    def step() -> float:
        loss = _loss_sum(model, batch, cpu)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)      # gradients stay resident: not activations
        return float(loss.detach())

    first = step()                             # warm-up: AdamW state, oneDNN caches
    base = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:   # resets VmHWM to the current RSS
        fh.write("5")
    times = []
    for _ in range(steps):
        t = time.process_time()
        step()
        times.append(time.process_time() - t)
    peak = (_rss_kib("VmHWM") - base) * 1024
    return {"setting": setting, "every": every, "params": shape.params, "first_loss": first,
            "activation_mib": peak / 2**20, "estimated_mib": est.activations / 2**20,
            "step_cpu_s": min(times), "step_cpu_s_all": times,
            "resident_before_mib": base / 1024}


def _parse(value: str):
    return {"false": False, "true": True}.get(value.lower(), None) if not value.isdigit() \
        else int(value)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", nargs="+", default=["false", "true", "2"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child")
    ap.add_argument("--json", help="append the result as a JSON line here")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(_parse(args.child), args.steps)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    load0 = os.getloadavg()[0]
    rows = []
    for setting in args.settings:
        out = subprocess.run([sys.executable, __file__, "--child", setting, "--steps",
                              str(args.steps)], env=env, text=True, capture_output=True)
        if out.returncode:
            raise SystemExit(f"{setting}: the child failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    off = next(r for r in rows if r["every"] == 0)
    print(f"retro-tiny ({off['params'] / 1e6:.1f}M params), seq {SEQ}, micro-batch {MB}, "
          f"k {K} x r {2 * CHUNK}, vocab {VOCAB}, fp32, 1 thread")
    print(f"{'checkpointing':>13} {'activations MiB':>15} {'x lower':>7} {'planner MiB':>11} "
          f"{'step cpu s':>10} {'x time':>6} {'loss':>7}")
    for r in rows:
        print(f"{str(r['setting']):>13} {r['activation_mib']:15.1f} "
              f"{off['activation_mib'] / r['activation_mib']:7.2f} {r['estimated_mib']:11.1f} "
              f"{r['step_cpu_s']:10.3f} {r['step_cpu_s'] / off['step_cpu_s']:6.2f} "
              f"{r['first_loss']:7.4f}")
    print(f"load average start/end {load0:.1f} / {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps({"rows": rows, "load": [load0, os.getloadavg()[0]]}) + "\n")


if __name__ == "__main__":
    main()
