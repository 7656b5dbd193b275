"""A positive control for the whole retrieval path through the model: where a neighbour holds
the continuation of a chunk, Retro learns to read it. Random tokens (no decoder can predict
them), neighbours of chunk j = [C_j, C_{j+1}] (a retrieved chunk and its continuation, RETRO's
r = 2m). After 160 AdamW steps the positions that attend to those neighbours beat both the same
model with gate 0 and the model given another sequence's neighbours."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from retro.components.models.retro import build_model
from tests.models.helpers import tiny

M, V, L, B, STEPS = 16, 512, 4, 16, 160


def _batch(g):
    toks = torch.randint(0, V, (B, (L + 1) * M + 1), generator=g)
    chunks = toks[:, : (L + 1) * M].view(B, L + 1, M)
    nb = torch.cat([chunks[:, :L], chunks[:, 1:]], dim=-1)[:, :, None]  # [B, L, k=1, 2m]
    return toks[:, : L * M], toks[:, 1: L * M + 1], nb


def _ce(model, ids, labels, nb):
    # positions m-1 ... n-1 cross-attend to their chunk's neighbours
    logits = model(ids, nb).logits[:, M - 1:]
    return F.cross_entropy(logits.reshape(-1, V), labels[:, M - 1:].reshape(-1)).item()


def test_retro_learns_to_read_a_neighbour_that_holds_the_continuation():
    torch.manual_seed(0)
    model = build_model(tiny(), None, M).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        ids, labels, nb = _batch(g)
        loss = model(ids, nb, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ids, labels, nb = _batch(torch.Generator().manual_seed(99))   # unseen sequences
    with torch.no_grad():
        read = _ce(model, ids, labels, nb)
        other = _ce(model, ids, labels, nb.roll(1, dims=0))     # another sequence's neighbours
        model.gate = 0.0
        off = _ce(model, ids, labels, nb)
    uniform = math.log(V)
    assert abs(off - uniform) < 0.1, (off, uniform)     # nothing to learn without retrieval
    assert read < off - 0.2, (read, off)
    assert read < other - 0.2, (read, other)            # the gain is the neighbours' content
