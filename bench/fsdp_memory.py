"""Per-worker peak RSS of a ≥300M-parameter Retro model: 1 worker vs 2 gloo workers under FSDP2.

Issue 15's target: under FSDP on 2 workers, each worker's peak RSS during init, training and
checkpointing is ≤ 0.6× the single-worker peak. Each configuration runs in fresh processes and
goes through the training loop's own pieces, phase by phase:

- init: 1 worker: the dense build (`job.model()`, as the loop does without FSDP); 2 workers,
  `loop` (what `loop.train` does for FSDP on CPU): `sharded.return_large_frees_to_os` (a fixed
  1 MiB glibc mmap threshold), `sharded.meta_model` + `loop._wrap` (fully_shard per
  `loop._shard_units`, then the root) + `sharded.materialise`, with the decoder streamed from a
  sharded safetensors GPT checkpoint (written once, beforehand); `blocks`: `loop` with the
  decoder blocks' sub-modules as the only units (`loop._block_units`: encoder, CCA and the
  untied head in the root, as the loop sharded before the finer units); `loop-glibc`: `loop`
  without the fixed threshold; `dense` (the loop before issue 15): every rank builds the whole
  model, then `_wrap` shards it;
- train: AdamW (fp32 masters and state) and STEPS optimizer steps through `loop._loss_sum`;
- checkpoint: `dcp.save_checkpoint` (every rank writes its own shards) into a LocalRuntime.

Measured per phase: the process's peak RSS (VmHWM, reset through /proc/self/clear_refs at the
phase's start), the worst rank. The ratio is each phase's 2-worker peak over the single
worker's overall peak, both as absolute RSS and above the import baseline (the RSS once torch,
transformers and retro are imported, before the model: bench/memory_planner.py's convention).
The single worker is measured twice, under glibc's default allocator settings (what the loop
runs it with) and with a fixed 1 MiB threshold (`MALLOC_MMAP_THRESHOLD_`, the stricter
reference: it lowers the single-worker peak too).

    .venv/bin/python bench/fsdp_memory.py              # the default runs (RUNS)
    .venv/bin/python bench/fsdp_memory.py --only loop  # one configuration
    FSDP_MEMORY_SMOKE=1 .venv/bin/python bench/fsdp_memory.py   # tiny dims, seconds
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# A llama-style Retro: 20 x 1024 decoder (ffn 2816), vocab 8k, untied head, 2-layer encoder,
# CCA at 6, 12, 18: 316M parameters (see the printed count)
OVERRIDES = {"n_layers": 20, "d_model": 1024, "n_heads": 16, "ffn_hidden": 2816,
             "vocab_size": 8192, "max_seq_len": 512, "tied_embeddings": False}
if os.environ.get("FSDP_MEMORY_SMOKE"):   # a seconds-long run of the same code paths
    OVERRIDES = {**OVERRIDES, "n_layers": 4, "d_model": 128, "n_heads": 4, "ffn_hidden": 256,
                 "vocab_size": 1024}
NODE = {"type": "retro", "preset": "retro-tiny", "overrides": OVERRIDES, "retro": True,
        "cca_layers": [2, 4] if os.environ.get("FSDP_MEMORY_SMOKE") else [6, 12, 18],
        "freeze": "unfrozen"}
CHUNK, SEQ, MB, K, STEPS = 64, 128, 1, 2, 2
CONFIGS = {"single": 1, "loop": 2, "blocks": 2, "loop-glibc": 2, "dense": 2}
# glibc's dynamic mmap threshold keeps freed 1-32 MB buffers (FSDP's per-unit gathers) in the
# heap; a fixed threshold returns them to the OS (the loop sets it in FSDP workers on CPU).
MALLOC = {"glibc-default": {}, "mmap-threshold-1MiB": {"MALLOC_MMAP_THRESHOLD_": "1048576"}}
# (allocator environment, configuration); `dense` holds 2 whole models at once: --only dense
RUNS = [("glibc-default", "single"), ("mmap-threshold-1MiB", "single"),
        ("glibc-default", "loop"), ("glibc-default", "blocks"), ("glibc-default", "loop-glibc")]


def _kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _worst(value: float, world: int) -> float:
    if world == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor(float(value))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def measure(name: str, gpt_dir: str, work: str) -> dict:
    """Runs in each worker process."""
    import torch

    from retro.components.training.checkpoint import LocalRuntime
    from retro.components.training.dcp import save_checkpoint
    from retro.components.training.loop import _loss_sum, _param_groups, _wrap
    from retro.components.training.models import build_fresh
    from retro.components.training.sharded import (materialise, meta_model,
                                                   return_large_frees_to_os)

    torch.set_num_threads(1)
    world = CONFIGS[name]
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    cpu = torch.device("cpu")
    builder = functools.partial(build_fresh, NODE, OVERRIDES["vocab_size"], CHUNK, retro=True,
                                init_dir=gpt_dir)
    g = torch.Generator().manual_seed(rank)
    vocab = OVERRIDES["vocab_size"]
    batch = {"input_ids": torch.randint(0, vocab, (MB, SEQ), generator=g),
             "labels": torch.randint(0, vocab, (MB, SEQ), generator=g),
             "loss_mask": torch.ones(MB, SEQ),
             "neighbours": torch.randint(0, vocab, (MB, SEQ // CHUNK, K, 2 * CHUNK), generator=g)}
    import retro.components.training.loop  # noqa: F401 - imports before the baseline
    base = _kib("VmRSS")
    peaks = {}

    _reset_peak()
    torch.manual_seed(0)
    if name in ("loop", "blocks"):    # as loop.train: the threshold before the model
        return_large_frees_to_os()
    if name == "blocks":              # encoder, CCA and the untied head in the root unit
        import retro.components.training.loop as loop

        loop._shard_units = loop._block_units
    if name != "dense" and world > 1:
        model = _wrap(meta_model(builder), True, world, cpu)
        materialise(model, 0, cpu)
    else:
        model = builder()
        model = _wrap(model, True, world, cpu)
    params = sum(p.numel() for p in model.parameters())
    peaks["init"] = _kib("VmHWM")

    _reset_peak()
    opt = torch.optim.AdamW(_param_groups(model, 0.1), lr=1e-4, fused=False)
    import time

    start = time.perf_counter()
    for _ in range(STEPS):
        (_loss_sum(model, batch, cpu) / SEQ).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peaks["train"] = _kib("VmHWM")
    train_s = time.perf_counter() - start

    _reset_peak()
    runtime = LocalRuntime(Path(work) / name)
    runtime.rank, runtime.world_size = rank, world
    save_checkpoint(runtime, model, opt, {"step": STEPS}, {"loss": 0.0})
    peaks["checkpoint"] = _kib("VmHWM")

    out = {"config": name, "workers": world, "params": params, "baseline_mib": base / 1024,
           **{f"{k}_mib": _worst(v, world) / 1024 for k, v in peaks.items()}}
    out["peak_mib"] = max(out[f"{k}_mib"] for k in peaks)
    out["train_s"] = _worst(train_s, world)
    out["baseline_mib"] = _worst(base, world) / 1024
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return out


def write_gpt(path: Path) -> None:
    """The decoder of NODE with random weights, saved as a sharded transformers checkpoint
    (several files + model.safetensors.index.json), as a GPT init."""
    import torch

    from retro.components.training.models import build_fresh

    node = {**NODE, "retro": False}
    node.pop("cca_layers")
    torch.manual_seed(1)
    gpt = build_fresh(node, OVERRIDES["vocab_size"], CHUNK, retro=False)
    gpt.decoder.save_pretrained(path, max_shard_size="200MB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", action="append", choices=list(CONFIGS))
    ap.add_argument("--malloc", action="append", choices=list(MALLOC))
    ap.add_argument("--child", nargs=3)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)), flush=True)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="fsdp-mem-") as tmp:
        gpt = Path(tmp) / "gpt"
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'bench'); "
                        f"import fsdp_memory; fsdp_memory.write_gpt(__import__('pathlib')"
                        f".Path({str(gpt)!r}))"], check=True, env=env)
        shards = sorted(p.name for p in gpt.glob("*.safetensors"))
        print(f"GPT init: {len(shards)} safetensors shards + index", flush=True)
        runs = RUNS if not (args.only or args.malloc) else \
            [(m, n) for m in args.malloc or ["glibc-default"] for n in args.only or CONFIGS]
        for malloc, name in runs:
            world = CONFIGS[name]
            port = str(29600 + os.getpid() % 1000)
            procs = [subprocess.Popen([sys.executable, __file__, "--child", name, str(gpt),
                                       tmp], text=True, stdout=subprocess.PIPE,
                                      env={**env, **MALLOC[malloc], "RANK": str(r),
                                           "WORLD_SIZE": str(world),
                                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
                     for r in range(world)]
            outs = [p.communicate()[0] for p in procs]
            if any(p.returncode for p in procs):
                raise SystemExit(f"{name}: a worker failed")
            r = json.loads(outs[0].strip().splitlines()[-1])
            r["malloc"] = malloc
            rows.append(r)
            print(f"{malloc:20s} {name:10s} x{world} params {r['params'] / 1e6:.0f}M  peak RSS MiB: "
                  f"init {r['init_mib']:7.0f}  train {r['train_mib']:7.0f}  checkpoint "
                  f"{r['checkpoint_mib']:7.0f}  overall {r['peak_mib']:7.0f}  (baseline "
                  f"{r['baseline_mib']:.0f}); {STEPS} steps {r['train_s']:.1f} s", flush=True)
    singles = [s for s in rows if s["workers"] == 1]
    for r in rows:
        if r["workers"] == 1:
            continue
        for single in singles:
            for label, off in (("absolute RSS", 0.0), ("above the import baseline", 1.0)):
                print(f"{r['config']} / single ({single['malloc']}), {label}: "
                      + ", ".join(f"{p} {(r[p + '_mib'] - off * r['baseline_mib']) / (single['peak_mib'] - off * single['baseline_mib']):.2f}"
                                  for p in ("init", "train", "checkpoint", "peak"))
                      + " (target <= 0.6)")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
