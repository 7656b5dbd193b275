"""Training throughput: our Retro vs RETRO-pytorch (lucidrains, PyPI `retro-pytorch` 0.3.9).

Same run, same threads, batch, dtype (fp32) and optimizer (AdamW lr 1e-4, wd 0.1, foreach) for four
models at identical dims: decoder 256 wide / 6 layers / 4 heads (head dim 64), encoder 256 / 2
layers, CCA at decoder layers 3 and 6, seq 512, batch 4, chunk 64, 2 neighbours of 128 tokens,
vocab 32000, plus each implementation's decoder-only baseline (no retrieval).

    ours-retro   RetroForCausalLM, gpt2 family (LayerNorm, GELU 4·d MLP: the same MLP as the
                 peer's), encoder cross-attention in encoder layer 1 (RETRO's P_enc = [1])
    ours-gpt     the same preset with `retro: false` (the bare transformers decoder)
    peer-retro   retro_pytorch.RETRO(..., enc_cross_attn_layers=(1,)) so its encoder matches
    peer-gpt     the same RETRO object called without `retrieved` (its decoder-only path)
    ours-retro-llama  (extra row) our default llama family (RMSNorm, RoPE, SwiGLU 640)

Reported: the fastest step of each model (the models take turns step by step, so on a shared
machine every model meets the same disturbance; the minimum is the least-disturbed step; the
median is printed too) and tokens/s from it; FLOPs per step counted by torch's FlopCounterMode
(attention through the math SDPA backend so it is counted, as the peer's einsum attention is);
achieved FLOP rate as a fraction of a large sgemm measured in the same run (best of the measurements taken
between rounds); and our Retro step
time against the time its extra FLOPs over our GPT predict (t_gpt · F_retro / F_gpt).

The peer is installed by this script, never by setup: `pip install --no-deps --target
~/.cache/retro-bench/peers retro-pytorch==0.3.9 einops==0.8.1` (torch is untouched). Its
package imports `autofaiss` at import time for index building, which the benchmark does not
use; a stub module stands in for it.

Usage:
    .venv/bin/python bench/model_vs_retro_pytorch.py [--threads 2] [--steps 1] [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

PEERS = ["retro-pytorch==0.3.9", "einops==0.8.1"]
PEER_DIR = Path.home() / ".cache" / "retro-bench" / "peers"
B, N, M, K, R, V = 4, 512, 64, 2, 128, 32000


def ensure_peer():
    """Install the peer into a private folder (no deps: torch stays as it is) and import it."""
    if not (PEER_DIR / "retro_pytorch").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--target", str(PEER_DIR), *PEERS], check=True)
    sys.path.insert(0, str(PEER_DIR))
    sys.modules.setdefault("autofaiss", types.SimpleNamespace(build_index=None))
    from retro_pytorch import RETRO

    return RETRO


def build_ours(family: str, retro: bool):
    from retro.components.models.retro import build_model
    from retro.platform.registry import registry

    registry.load_plugins()
    node = registry.get("model", "retro").node_model().model_validate({
        "type": "retro", "preset": "gpt2-tiny" if family == "gpt2" else "retro-tiny",
        "cca_layers": [3, 6], "retro": retro,
        "overrides": {"max_seq_len": N, "tied_embeddings": False}})  # untied, as the peer
    return build_model(node, V, M).train()


def make_cases(RETRO, data):
    import torch
    import torch.nn.functional as F

    seq, nb = data  # seq: [B, N+1]; nb: [B, N/M, K, R] with ids ≥ 1 (0 is the peer's padding)
    ids, labels = seq[:, :-1], seq[:, 1:]

    def ours(family, retro):
        model = build_ours(family, retro)
        return model, lambda: model(ids, nb if retro else None, labels=labels).loss

    def peer(retro):
        torch.manual_seed(0)
        model = RETRO(num_tokens=V, max_seq_len=N, enc_dim=256, enc_depth=2,
                      enc_cross_attn_layers=(1,), dec_dim=256, dec_depth=6,
                      dec_cross_attn_layers=(3, 6), heads=4, dim_head=64, chunk_size=M).train()
        if retro:
            return model, lambda: model(seq, nb, return_loss=True)
        return model, lambda: F.cross_entropy(model(ids).transpose(1, 2), labels)

    return {
        "ours-retro": ours("gpt2", True), "ours-gpt": ours("gpt2", False),
        "peer-retro": peer(True), "peer-gpt": peer(False),
        "ours-retro-llama": ours("llama", True), "ours-gpt-llama": ours("llama", False),
    }


def count_flops(loss_fn) -> int:
    """FLOPs of one forward + backward (attention counted through the math SDPA backend)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_fn().backward()
    return counter.get_total_flops()


def sgemm_rate(n: int = 2048, reps: int = 8) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per model per round")
    ap.add_argument("--rounds", type=int, default=6, help="rounds interleaving the models")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    RETRO = ensure_peer()
    import torch

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    data = (torch.randint(1, V, (B, N + 1), generator=g),
            torch.randint(1, V, (B, N // M, K, R), generator=g))
    cases = make_cases(RETRO, data)
    info = {}
    for name, (model, loss_fn) in cases.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
        flops = count_flops(loss_fn)
        model.zero_grad(set_to_none=True)
        info[name] = {"model": model, "loss_fn": loss_fn, "opt": opt, "flops": flops,
                      "params": sum(p.numel() for p in model.parameters()), "times": []}

    def step(c):
        c["opt"].zero_grad(set_to_none=True)
        c["loss_fn"]().backward()
        c["opt"].step()

    for c in info.values():  # warm-up
        step(c)
    rates = [sgemm_rate()]
    for _ in range(args.rounds):
        for c in info.values():
            for _ in range(args.steps):
                t = time.perf_counter()
                step(c)
                c["times"].append(time.perf_counter() - t)
        rates.append(sgemm_rate())
    sgemm = max(rates)

    rows = {}
    for name, c in info.items():
        t = min(c["times"])  # the least-disturbed step: robust on a shared machine
        rows[name] = {"params_M": c["params"] / 1e6, "step_s": t,
                      "step_s_median": statistics.median(c["times"]), "tokens_per_s": B * N / t,
                      "gflops_per_step": c["flops"] / 1e9,
                      "flop_rate_vs_sgemm": c["flops"] / t / sgemm}
    summary = {}
    for suffix in ("", "-llama"):
        r, gpt = rows[f"ours-retro{suffix}"], rows[f"ours-gpt{suffix}"]
        predicted = gpt["step_s"] * r["gflops_per_step"] / gpt["gflops_per_step"]
        summary[f"ours{suffix}_retro_vs_flop_prediction"] = r["step_s"] / predicted
        summary[f"ours{suffix}_retro_vs_peer_retro_tokens_per_s"] = (
            r["tokens_per_s"] / rows["peer-retro"]["tokens_per_s"])
    summary["ours_gpt_vs_peer_gpt_tokens_per_s"] = (rows["ours-gpt"]["tokens_per_s"]
                                                    / rows["peer-gpt"]["tokens_per_s"])
    env = {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or
           platform.machine(), "load_avg_at_end": os.getloadavg()[0],
           "sgemm_gflops": sgemm / 1e9, "steps_timed_per_model": args.steps * args.rounds,
           "batch": B, "seq": N, "chunk": M, "neighbours": K, "retrieved_len": R, "vocab": V}

    print(f"{'model':18} {'params':>8} {'step s':>8} {'median':>8} {'tok/s':>8} {'GFLOP':>8} "
          f"{'of sgemm':>9}")
    for name, r in rows.items():
        print(f"{name:18} {r['params_M']:7.2f}M {r['step_s']:8.3f} {r['step_s_median']:8.3f} "
              f"{r['tokens_per_s']:8.0f} {r['gflops_per_step']:8.1f} "
              f"{r['flop_rate_vs_sgemm']:9.2f}")
    for k, v in summary.items():
        print(f"{k}: {v:.2f}")
    print(f"sgemm 2048³: {sgemm / 1e9:.1f} GFLOP/s; threads {args.threads}; "
          f"load average {env['load_avg_at_end']:.1f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary, "env": env},
                                        indent=2))


if __name__ == "__main__":
    main()
