"""QA-shaped generation with SmolLM2-135M-Instruct in fp32, plain bf16 autocast and
`inference_autocast` (bf16 Linear weights made once, fp32 CPU attention, packed one-token
decode attention): prefill of a ~850-token prompt (a RAG prompt with 5 passages) and 24 new
tokens (rag-eval's `max_new_tokens`), interleaved A B C A B C so load drift hits all alike.
Reports wall and CPU seconds (the machine is shared: CPU seconds are the steadier number).

Usage: .venv/bin/python -m bench.inference_precision [--prompt 850] [--new 24] [--repeats 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=850)
    ap.add_argument("--new", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    from retro.components.evaluators.lm import load_eval_lm
    from retro.components.models.retro import generate, import_gguf_checkpoint
    from retro.components.precision import autocast, inference_autocast

    torch.set_num_threads(args.threads)
    out = Path(tempfile.mkdtemp(prefix="retro-bench-infer-"))
    import_gguf_checkpoint(out)
    lm = load_eval_lm(out)
    fast = copy.deepcopy(lm.model)
    vocab = lm.model.decoder.config.vocab_size
    prompt = torch.randint(0, vocab, (args.prompt,), generator=torch.Generator().manual_seed(0))
    prompt = prompt.tolist()
    ways = {"fp32": (lm.model, lambda: torch.autograd.grad_mode.no_grad()),
            "bf16 autocast": (lm.model, lambda: autocast("bf16")),
            "bf16 inference_autocast": (fast, lambda: inference_autocast(fast, "bf16"))}
    print(f"load average {os.getloadavg()}; prompt {args.prompt} tokens, {args.new} new",
          flush=True)
    rows: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        for name, (model, ctx) in ways.items():
            for new in (1, args.new):
                w, c = time.perf_counter(), time.process_time()
                with ctx():
                    generate(model, lm.tokenizer, prompt, new, eos_token_id=-1)
                rows.setdefault((name, new), []).append((time.perf_counter() - w,
                                                         time.process_time() - c))
    print(f"load average {os.getloadavg()}")
    print("| precision | prefill + 1 token: wall / CPU s (best) | "
          f"{args.new - 1} more tokens: CPU s per token | total CPU s | x fp32 (CPU) |")
    print("|---|---:|---:|---:|---:|")
    base = min(c for _, c in rows[("fp32", args.new)])
    for name in ways:
        one = min(rows[(name, 1)], key=lambda r: r[1])
        full = min(c for _, c in rows[(name, args.new)])
        per = (full - one[1]) / (args.new - 1)
        print(f"| {name} | {one[0]:.2f} / {one[1]:.2f} | {per:.3f} | {full:.2f} | "
              f"{base / full:.2f} |")


if __name__ == "__main__":
    main()
