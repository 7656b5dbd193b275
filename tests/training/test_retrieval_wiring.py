"""Retrieval is wired end to end: on a corpus whose every other chunk can only be known from
the neighbours, Retro-fitting beats GPT-fitting by far, and shifting the neighbours by one chunk
takes the gain away (so chunk j really receives chunk j's neighbours)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from retro.components.training.checkpoint import LocalRuntime
from retro.components.training.data import ArrayNeighbours
from retro.components.training.loop import evaluate, train
from retro.components.training.models import build_fresh, load_trained
from tests.training.helpers import job, nano, rows_of

V, M, L = 64, 4, 16          # vocabulary, chunk length, sequence length (4 chunks)
STEPS = 160


def key_value_corpus(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sequences alternate a key chunk and a value chunk, both fresh random tokens per pair, so
    no model can predict a value from the text. The chunk DB holds each pair (key chunk, value
    chunk as its continuation): the neighbour of a key chunk is its own pair; a value chunk's
    neighbour is a random other chunk. Returns tokens [n, L] and neighbours [n, L/M, 1, 2M]."""
    chunks = L // M
    tokens = np.zeros((n, L), np.int64)
    neighbours = rng.integers(0, V, (n, chunks, 1, 2 * M))
    for i in range(n):
        for j in range(0, chunks, 2):
            key, value = rng.integers(0, V // 2, M), rng.integers(V // 2, V, M)
            tokens[i, j * M:(j + 1) * M], tokens[i, (j + 1) * M:(j + 2) * M] = key, value
            neighbours[i, j, 0] = np.concatenate([key, value])
    return tokens, neighbours


def test_retro_fit_beats_gpt_fit_only_with_aligned_neighbours(tmp_path):
    rng = np.random.default_rng(0)
    train_tokens, train_nb = key_value_corpus(1024, rng)
    valid_tokens, valid_nb = key_value_corpus(64, rng)
    np.save(tmp_path / "train.npy", train_tokens)
    np.save(tmp_path / "valid.npy", valid_tokens)
    gpt = build_fresh(nano(), V, M, retro=False)               # the GPT both arms start from
    gpt.save_pretrained(tmp_path / "gpt")

    def fit(name, retro):
        node = nano(retro=retro, encoder_layers=1)
        model = functools.partial(build_fresh, node, V, M, retro=retro,
                                  init_dir=str(tmp_path / "gpt"))
        j = job(tmp_path / name, tmp_path / "train.npy", tmp_path / "valid.npy", seq_length=L,
                steps=STEPS, global_batch=16, lr=5e-3, model=model, micro_batch=16,
                eval_batches=4, eval_interval=STEPS,
                neighbours=(lambda: ArrayNeighbours(train_nb)) if retro else None,
                valid_neighbours=(lambda: ArrayNeighbours(valid_nb)) if retro else None)
        train(j, LocalRuntime(tmp_path / f"{name}-ckpt"))
        return j, [r for r in rows_of(j.metrics_file) if r["kind"] == "eval"][-1]["val_ppl"]

    retro_job, retro_ppl = fit("retro-fit", True)
    _, gpt_ppl = fit("gpt-fit", False)
    # Keys and values are uniform over 32 tokens: GPT can do no better than ppl ~32; copying
    # the values from the neighbours' continuations takes Retro towards sqrt(32) ~ 5.7.
    assert gpt_ppl > 28
    assert retro_ppl < 0.5 * gpt_ppl, (retro_ppl, gpt_ppl)

    # The same trained Retro model, fed each chunk the neighbours of the chunk before it.
    shifted = np.roll(valid_nb, 1, axis=1)
    shifted[:, 0] = -1                                          # chunk 0: no neighbour
    model = load_trained(str(retro_job.final_dir))
    rows = retro_job.val_data()
    rows.neighbours = ArrayNeighbours(shifted)
    shifted_ppl = evaluate(model, rows, retro_job.run, 16, 0, 1, torch.device("cpu"))["val_ppl"]
    assert shifted_ppl > 0.9 * gpt_ppl, (shifted_ppl, gpt_ppl, retro_ppl)
