"""KV-cached generation (incremental.py) against the definition: the full forward.

Every cached logit must equal the full `RetroForCausalLM.forward` over the sequence so far
(with the neighbours of its completed chunks), so greedy decoding is identical token for token
in fp32; a left-padded batch must give each row what it gives alone, whatever its chunk phase.
"""

from __future__ import annotations

import pytest
import torch

from retro.components.models.retro import CachedRetro, build_model, generate, generate_batch
from tests.models.helpers import node

M = 16
FAMILIES = {"llama": {}, "gpt2": {"family": "gpt2", "bias": True}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many tiny forwards: one intra-op thread (two spin badly on the loaded shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class CharTokenizer:
    """Token id = byte value."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) % 256 for i in ids).decode("latin-1")


def neighbours_of(text: str) -> list[list[int]]:
    """A deterministic retriever: two neighbours of r = 2m tokens that depend on the chunk."""
    codes = [ord(c) for c in text]
    return [(codes[::-1] * 3)[: 2 * M], [(c * 7 + 3) % 256 for c in codes][: 2 * M - 5]]


def model_for(family: str, retro: bool = True, gate: float = 4.0):
    torch.manual_seed(0)
    # init_std 0.2: a random model whose greedy output varies (0.02 repeats one token)
    model = build_model(node(preset="retro-nano", overrides=FAMILIES[family] | {"init_std": 0.2},
                             retro=retro), 256, M).eval()
    model.gate = gate  # a strong CCA, so a wrong neighbour or shift changes the argmax
    return model


def full_logits(model, ids: list[int], retrieve) -> torch.Tensor:
    """Last-position logits of the uncached forward, neighbours for each completed chunk."""
    nb = None
    if retrieve is not None and len(ids) >= M:
        blocks = [retrieve(CharTokenizer().decode(ids[j * M:(j + 1) * M]))
                  for j in range(len(ids) // M)]
        k, r = max(len(b) for b in blocks), max(len(x) for b in blocks for x in b)
        nb = torch.full((1, len(blocks), k, r), -1)
        for j, b in enumerate(blocks):
            for i, x in enumerate(b):
                nb[0, j, i, : len(x)] = torch.tensor(x)
    with torch.no_grad():
        return model(torch.tensor([ids]), nb).logits[0, -1]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("retro", [False, True])
def test_cached_step_logits_equal_the_full_forward_at_every_position(family, retro):
    """Teacher-forced: prompt 2m+5 tokens, then 3m+4 tokens one by one, so generation crosses
    three chunk boundaries (positions (j+1)m-1 get chunk j's neighbours the step they appear)."""
    model = model_for(family, retro)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, 256, (5 * M + 9,), generator=g).tolist()
    prompt = 2 * M + 5
    retrieve = neighbours_of if retro else None
    state = CachedRetro(model, 1, CharTokenizer(), [retrieve])
    with torch.inference_mode():
        got = [state.step(torch.tensor([seq[:prompt]]))[0]]
        got += [state.step(torch.tensor([[t]]))[0] for t in seq[prompt:]]
    for n, logits in zip(range(prompt, len(seq) + 1), got):
        expected = full_logits(model, seq[:n], retrieve)
        torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-5, msg=f"length {n}")
    if retro:
        assert state.retrieved_chunks == [len(seq) // M]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_cached_equals_uncached_token_for_token(family):
    for retro, retrieve in [(False, None), (True, neighbours_of)]:
        model = model_for(family, retro)
        prompt = torch.randint(0, 256, (2 * M + 3,), generator=torch.Generator().manual_seed(3))
        prompt = prompt.tolist()
        cached = generate(model, CharTokenizer(), prompt, max_new_tokens=3 * M + 2,
                          retrieve=retrieve)
        plain = generate(model, CharTokenizer(), prompt, max_new_tokens=3 * M + 2,
                         retrieve=retrieve, use_cache=False)
        assert cached.ids == plain.ids and len(cached.ids) == 3 * M + 2
        assert cached.neighbours == plain.neighbours
        chunks = (len(prompt) + 3 * M + 1) // M if retro else 0  # the last token is not fed
        assert cached.retrieved_chunks == plain.retrieved_chunks == chunks
    # the neighbours matter: gated off, the same model continues differently
    off = generate(model, CharTokenizer(), prompt, max_new_tokens=3 * M + 2, retrieve=retrieve,
                   gate=0.0)
    assert off.ids != cached.ids and off.retrieved_chunks == 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("retro", [False, True])
def test_left_padded_batch_equals_one_by_one(family, retro):
    """Prompts of 5, m, m+7, 2m+15 and 3m real tokens: each row completes its chunks at a
    different step of the batch, and rows stop at different steps (stop sequence)."""
    model = model_for(family, retro)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist()
               for n in (5, M, M + 7, 2 * M + 15, 3 * M)]
    retrieve = neighbours_of if retro else None
    alone = [generate(model, CharTokenizer(), p, max_new_tokens=2 * M + 3, retrieve=retrieve)
             for p in prompts]
    stop = CharTokenizer().decode(alone[2].ids[9:11])  # row 2 stops early
    alone = [generate(model, CharTokenizer(), p, max_new_tokens=2 * M + 3, retrieve=retrieve,
                      stop_sequences=[stop]) for p in prompts]
    batch = generate_batch(model, CharTokenizer(), prompts, max_new_tokens=2 * M + 3,
                           retrieve=retrieve, stop_sequences=[stop])
    assert alone[2].stop_reason == "stop_sequence"
    assert len({len(a.ids) for a in alone}) > 1
    for one, many in zip(alone, batch):
        assert many.ids == one.ids
        assert (many.text, many.stop_reason) == (one.text, one.stop_reason)
        assert many.neighbours == one.neighbours
        assert many.retrieved_chunks == one.retrieved_chunks


def test_batch_takes_one_retrieve_per_row_and_rows_without_one_get_no_cca():
    model = model_for("llama", True)
    prompt = list(range(97, 97 + 2 * M + 3))
    with_nb, without = generate_batch(model, CharTokenizer(), [prompt, prompt], 6,
                                      retrieve=[neighbours_of, None])
    assert with_nb.ids == generate(model, CharTokenizer(), prompt, 6, retrieve=neighbours_of).ids
    assert without.ids == generate(model, CharTokenizer(), prompt, 6, gate=0.0).ids
    assert with_nb.retrieved_chunks == 2 and without.retrieved_chunks == 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("retro", [False, True])
def test_left_padded_batch_logits_equal_each_rows_full_forward(family, retro):
    """Teacher-forced batch: rows of 3, m-1, m+4 and 2m+9 prompt tokens, then 2m+3 tokens each;
    at every step each row's logits equal its own unpadded full forward (positions count real
    tokens only; chunks are each row's own)."""
    model = model_for(family, retro)
    g = torch.Generator().manual_seed(4)
    lengths, extra = (3, M - 1, M + 4, 2 * M + 9), 2 * M + 3
    seqs = [torch.randint(0, 256, (n + extra,), generator=g).tolist() for n in lengths]
    retrieve = neighbours_of if retro else None
    width = max(lengths)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    real = torch.zeros((len(seqs), width), dtype=torch.bool)
    for r, (s, n) in enumerate(zip(seqs, lengths)):
        ids[r, width - n:], real[r, width - n:] = torch.tensor(s[:n]), True
    state = CachedRetro(model, len(seqs), CharTokenizer(), [retrieve] * len(seqs))
    with torch.inference_mode():
        got = [state.step(ids, real)]
        got += [state.step(torch.tensor([[s[n + t]] for s, n in zip(seqs, lengths)]))
                for t in range(extra - 1)]
    for t, logits in enumerate(got):
        for r, (s, n) in enumerate(zip(seqs, lengths)):
            expected = full_logits(model, s[:n + t], retrieve)
            torch.testing.assert_close(logits[r], expected, atol=2e-5, rtol=1e-5,
                                       msg=f"row {r} step {t}")


def test_blocks_of_columns_after_a_filled_cache_equal_one_block():
    """CachedRetro.step with several columns while the cache already holds earlier ones (the
    mask must be causal across blocks; chunks complete inside blocks)."""
    model = model_for("llama", True)
    seq = torch.randint(0, 256, (3 * M + 9,), generator=torch.Generator().manual_seed(5)).tolist()
    one = CachedRetro(model, 1, CharTokenizer(), [neighbours_of])
    blocks = CachedRetro(model, 1, CharTokenizer(), [neighbours_of])
    with torch.inference_mode():
        whole = one.step(torch.tensor([seq]))
        for a in range(0, len(seq), 7):
            last = blocks.step(torch.tensor([seq[a:a + 7]]))
    torch.testing.assert_close(last, whole, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(last[0], full_logits(model, seq, neighbours_of), atol=2e-5,
                               rtol=1e-5)
    assert blocks.neighbours == one.neighbours and len(one.neighbours[0]) == len(seq) // M


def test_cached_generation_runs_under_bf16_autocast():
    """precision bf16 runs generation under CPU autocast: bf16 attention outputs meet the fp32
    residual stream (a prompt with several chunks goes through the block CCA path)."""
    model = model_for("gpt2", True)
    prompts = [list(range(97, 97 + n)) for n in (5, 2 * M + 7)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate_batch(model, CharTokenizer(), prompts, M + 4, retrieve=neighbours_of)
    assert [len(g.ids) for g in out] == [M + 4] * 2
    assert [g.retrieved_chunks for g in out] == [(5 + M + 3) // M, (2 * M + 7 + M + 3) // M]
