"""QA-shaped generation with SmolLM2-135M (long prompts, short answers): the previous path (the
transformers decoder's own forward with a DynamicCache, logits over every prompt position, one
question at a time) vs `generate` (one at a time) vs `generate_batch` (all at once), interleaved
A B C A B C so load drift on the shared machine hits all three alike.

Usage: .venv/bin/python bench/generation_qa_like.py [--prompts 4] [--new 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch
    from transformers import DynamicCache

    from retro.components.evaluators.lm import load_eval_lm
    from retro.components.models.retro import generate, generate_batch, import_gguf_checkpoint

    torch.set_num_threads(args.threads)
    out = Path(tempfile.mkdtemp(prefix="retro-bench-qa-"))
    import_gguf_checkpoint(out)
    lm = load_eval_lm(out)
    g = torch.Generator().manual_seed(0)
    vocab = lm.model.decoder.config.vocab_size
    lens = torch.randint(600, 1500, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]

    def previous(p):
        cache, x, new = DynamicCache(config=lm.model.decoder.config), p, []
        with torch.inference_mode():
            for _ in range(args.new):
                logits = lm.model.decoder(input_ids=torch.tensor([x]), cache=cache,
                                          use_cache=True).logits
                new.append(int(logits[0, -1].argmax()))
                x = [new[-1]]
        return new

    ways = {"previous (HF forward + cache)": lambda: [previous(p) for p in prompts],
            "generate, one at a time": lambda: [generate(lm.model, lm.tokenizer, p, args.new,
                                                         eos_token_id=-1).ids for p in prompts],
            "generate_batch": lambda: [x.ids for x in generate_batch(
                lm.model, lm.tokenizer, prompts, args.new, eos_token_id=-1)]}
    print(f"load average {os.getloadavg()}; prompt lengths {lens}, {args.new} new tokens",
          flush=True)
    times = {k: [] for k in ways}
    outputs = {}
    for _ in range(args.repeats):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    base = min(times["previous (HF forward + cache)"])
    for name, ts in times.items():
        print(f"{name}: best {min(ts):.1f} s of {['%.1f' % t for t in ts]} "
              f"({base / min(ts):.2f}x the previous path)", flush=True)
    print(f"same tokens: {len({str(v) for v in outputs.values()}) == 1}; "
          f"load average {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
