"""In-context RALM (Ram et al. 2023) for perplexity: the `eval-ralm` stage and `RalmScorer`.

Eq. 4 of the paper: p(x) = Π_j Π_{i=1..s} p_θ(x_{s·j+i} | [R(q_j); x_{<s·j+i}]), the query
q_j = the last ℓ tokens *before* stride j (x_{s·j-ℓ+1}..x_{s·j}), the LM frozen. Here, per
held-out sequence of n tokens (the tokens `eval-ppl` scores: positions 1..n-1):

- block 0 (targets 1..s-1) has no prefix to query with and is scored without retrieval, as the
  reference code's first window (AI21Labs/in-context-ralm eval_lm.py: idx 0, no retrieval);
- block j >= 1 (targets j·s .. j·s+s-1) retrieves with the decoded text of tokens
  [j·s-ℓ, j·s): never a token at or after the first predicted position;
- the top document's tokens (its title and a newline, then the DB chunk + continuation, at most
  `doc_tokens`) are
  prepended; doc + prefix fit the baseline's token budget (the window - 1 input tokens of a
  sequence-length forward), the prefix cut from the left, as the reference code overwrites the
  first |doc| positions of its 1024-token window;
- hits from the evaluated sequence's own documents are dropped after over-retrieving
  `candidates` (the reference drops WikiText-103's 125 forbidden titles after over-retrieving
  max(100, 4k)); a block left without a document is scored on the prefix alone;
- `ensemble`: REPLUG, p(y) = Σ_d w_d p(y | d ∘ x), w = softmax of the retrieval scores
  (REPLUG models.py) or uniform; in log space (logsumexp).
The base LM's NLL (`lm_nll`) is one plain forward over the sequence, the `eval-ppl` score.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from retro.components.evaluators.ablation import EvalParams, evaluator_settings
from retro.platform.spec.node import Node
from retro.platform.stage import Slot, StageContext, stage
from retro.components.devices import module_device, stage_device
from retro.components.evaluators.lm import load_eval_lm
from retro.components.knnlm.datastore import check_plain_lm
from retro.components.knnlm.scoring import SequenceRows, check_vocab, declare
from retro.components.precision import inference_autocast, stage_precision
from retro.components.retrieval.api import Retriever, Sequences


@dataclass(frozen=True)
class Hit:
    """One retrieved document: its tokens, the corpus document it comes from, its score."""

    tokens: tuple[int, ...]
    doc: int
    score: float


Search = Callable[[list[list[int]], int], list[list[Hit]]]
"""query token ids (one list per query), n -> the top-n hits of each query, best first."""
Score = Callable[[list[list[int]], list[int], list[list[int]]], list[np.ndarray]]
"""(inputs, first target index in each input, targets) -> log p(target) arrays: the logits at
input position first + t predict targets[t]."""


def blocks(n: int, stride: int) -> list[tuple[int, int]]:
    """[lo, hi) target positions of each block of an n-token sequence (targets 1..n-1):
    block 0 is [1, max(2, stride)) and is scored without retrieval; block j >= 1 starts at
    the next multiple of the stride."""
    first = min(max(2, stride), n)
    return [(1, first)] + [(lo, min(lo + stride, n)) for lo in range(first, n, stride)]


def fit_context(toks: list[int], lo: int, hi: int, doc: list[int], budget: int
                ) -> tuple[list[int], int]:
    """(input ids, index of the input position predicting toks[lo]): `doc` + the prefix
    toks[a:hi-1] within `budget` input tokens; the doc is cut so that toks[lo-1] fits."""
    doc = doc[:max(0, budget - (hi - lo))]
    a = max(0, hi - 1 - (budget - len(doc)))
    return doc + toks[a:hi - 1], len(doc) + (lo - 1 - a)


class RalmScorer:
    """In-context RALM log-probs of one sequence's targets, with injectable search and LM."""

    def __init__(self, cfg: Any, search: Search, score: Score, higher_is_better: bool = True):
        self.cfg, self.search, self.score = cfg, search, score
        self.sign = 1.0 if higher_is_better else -1.0
        self.trace: list[dict[str, Any]] = []   # per block: lo, hi, query, docs used
        self.forward_tokens = 0                  # input tokens the LM ran on (cost)
        self.queries = 0

    def sequence_log_probs(self, toks: list[int], exclude_docs: Any) -> np.ndarray:
        """log p(toks[p] | retrieval, prefix) for p = 1..n-1 ([n-1] float64)."""
        cfg, n = self.cfg, len(toks)
        budget = (cfg.context_window or n) - 1
        spans = blocks(n, cfg.stride)
        queries = [toks[max(0, lo - cfg.query_length):lo] for lo, _ in spans[1:]]
        retrieved = self.search(queries, cfg.candidates) if queries else []
        excluded = set(int(d) for d in np.asarray(exclude_docs).reshape(-1))
        plan: list[tuple[int, int, list[Hit]]] = [(*spans[0], [])]
        for (lo, hi), q, hits in zip(spans[1:], queries, retrieved):
            kept = [h for h in hits if h.doc not in excluded][:cfg.docs]
            plan.append((lo, hi, kept))
            self.trace.append({"lo": lo, "hi": hi, "query": list(q),
                               "docs": [h.doc for h in kept],
                               "dropped": sum(h.doc in excluded for h in hits)})
        inputs, firsts, targets = [], [], []
        for lo, hi, kept in plan:
            for h in kept or [None]:
                ids, first = fit_context(toks, lo, hi, list(h.tokens[:cfg.doc_tokens])
                                         if h else [], budget)
                inputs.append(ids)
                firsts.append(first)
                targets.append(toks[lo:hi])
        logps = self.score(inputs, firsts, targets)
        self.forward_tokens += sum(map(len, inputs))
        self.queries += len(queries)
        out = np.zeros(n - 1, dtype=np.float64)
        at = 0
        for lo, hi, kept in plan:
            m = max(1, len(kept))
            rows = np.stack([np.asarray(x, dtype=np.float64) for x in logps[at:at + m]])
            at += m
            out[lo - 1:hi - 1] = rows[0] if m == 1 else self._mix(rows, kept)
        return out

    def _mix(self, rows: np.ndarray, kept: list[Hit]) -> np.ndarray:
        """REPLUG: logsumexp_d(log w_d + log p_d(y))."""
        if self.cfg.ensemble_weights == "uniform":
            logw = np.full(len(kept), -math.log(len(kept)))
        else:
            s = self.sign * np.array([h.score for h in kept], dtype=np.float64)
            logw = s - (np.log(np.exp(s - s.max()).sum()) + s.max())
        z = rows + logw[:, None]
        top = z.max(axis=0)
        return top + np.log(np.exp(z - top).sum(axis=0))


def lm_scorer(decoder: Any, pad_id: int, batch: int = 16) -> Score:
    """A `Score` running an HF causal LM on right-padded batches."""
    import torch

    device = module_device(decoder)

    def score(inputs: list[list[int]], firsts: list[int], targets: list[list[int]]
              ) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for a in range(0, len(inputs), batch):
            chunk = inputs[a:a + batch]
            width = max(len(x) for x in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, x in enumerate(chunk):
                ids[i, :len(x)] = torch.tensor(x)
                mask[i, :len(x)] = 1
            with torch.inference_mode():
                logits = decoder(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 use_cache=False).logits
                logp = torch.log_softmax(logits.float(), -1).cpu()
            for i in range(len(chunk)):
                f, t = firsts[a + i], torch.tensor(targets[a + i])
                out.append(logp[i, f:f + len(t)].gather(-1, t[:, None])[:, 0].double().numpy())
        return out

    return score


def retriever_search(retriever: Any, cfg: Any) -> Search:
    """A `Search` over the platform's `Retriever` (BM25 or dense): queries decoded to text
    with the DB tokenizer; documents = DB chunk (+ continuation) tokens."""
    db = retriever.chunk_db

    def doc_tokens(chunk_id: int) -> tuple[int, ...]:
        ids = [chunk_id]
        if cfg.continuation:
            nxt = int(db.continuation(np.array([chunk_id]))[0])
            ids += [nxt] if nxt >= 0 else []
        out: list[int] = []
        title = db.doc_table()[int(db.doc_of(np.array([chunk_id]))[0])].get("title") \
            if cfg.title else None
        if title:
            out += list(retriever.tokenizer.encode(title + "\n", add_special_tokens=False))
        for c in ids:
            _, s, size = (int(v) for v in db.chunks[c])
            out += np.asarray(db.tokens[s:s + size]).tolist()
        return tuple(out[:cfg.doc_tokens])

    def search(queries: list[list[int]], n: int) -> list[list[Hit]]:
        texts = [retriever.tokenizer.decode(q, skip_special_tokens=True) for q in queries]
        out = []
        for passages in retriever.search(texts, n):
            docs = db.doc_of(np.array([p.chunk_id for p in passages], dtype=np.int64))
            out.append([Hit(doc_tokens(p.chunk_id), int(d), p.score)
                        for p, d in zip(passages, docs)])
        return out

    return search


class EvalRalmParams(EvalParams):
    retriever: Node("retriever")
    """The retriever node (BM25 or dense), as the DB was built with."""


_R = "the retrieval DB: "


@stage("eval-ralm", version="2", params=EvalRalmParams,
       inputs={"model": "the frozen LM (import-gguf, lm-folder, a GPT)",
               "sequences": "held-out sequences (sequences-valid)",
               "tokenizer": _R + "its tokenizer (tokenizer)",
               "tokens": _R + "document tokens (tokenize)",
               "chunk_db": _R + "the chunk table (chunk-db)",
               "index": Slot(_R + "the dense index (fill-index)", optional=True),
               "bm25": Slot(_R + "the BM25 index (bm25-index)", optional=True)},
       estimate=lambda p: {"stride": p.evaluator.stride, "query": p.evaluator.query_length,
                           "docs": p.evaluator.docs})
def eval_ralm(ctx: StageContext[EvalRalmParams]) -> dict[str, Any]:
    """In-context RALM and base-LM perplexity of the tokens `eval-ppl` scores.

    Params: `evaluator` (the in-context-ralm node), `retriever`. Inputs: `model`,
    `sequences`, the DB (`tokenizer`, `tokens`, `chunk_db`, `index` or `bm25`).
    Writes: per_sequence.jsonl ({seq, nll, lm_nll, tokens, bytes, text_nll, lm_text_nll,
    blocks_with_doc}), retrievals.jsonl (first sequences' queries and documents), scores.json,
    results.json.
    """
    import torch


    cfg = evaluator_settings(ctx.params)
    seqs = Sequences(ctx.inputs["sequences"])
    retriever = Retriever.from_artifacts(ctx.params.retriever, ctx.inputs)
    device = stage_device(ctx)
    lm = load_eval_lm(ctx.inputs["model"].path, ctx.inputs["tokenizer"].path,
                      threads=max(1, int(ctx.resources.cpus_per_worker)), device=device)
    check_plain_lm(lm, ctx.name)
    check_vocab(lm, retriever.tokenizer, ctx.name)
    precision = stage_precision(ctx, cfg.precision, device)
    node = ctx.params.retriever
    higher = not (node.type != "bm25" and getattr(node.index, "metric", "ip") == "l2")
    decoder = lm.model.decoder
    scorer = RalmScorer(cfg, retriever_search(retriever, cfg),
                        lm_scorer(decoder, int(seqs.eod_id), batch=max(4, cfg.batch_size)),
                        higher_is_better=higher)
    n = min(len(seqs), cfg.max_sequences or len(seqs))
    rows = SequenceRows(ctx.out_dir, retriever.tokenizer)
    with ctx.progress(n, ctx.name) as bar, open(ctx.out_dir / "retrievals.jsonl", "w") as rfh, \
            inference_autocast(decoder, precision, device):
        for seq in range(n):
            toks = np.asarray(seqs.tokens[seq], dtype=np.int64)
            with ctx.timer("forward"), torch.inference_mode():
                ids = torch.from_numpy(toks[None, :-1]).to(device)
                base = torch.log_softmax(decoder(input_ids=ids, use_cache=False).logits.float(),
                                         -1).cpu()
                lm_logp = base[0].gather(-1, torch.from_numpy(toks[1:, None]))[:, 0].double()
            scorer.trace = []
            with ctx.timer("retrieval+forward"):
                logp = scorer.sequence_log_probs(toks.tolist(), seqs.docs(seq))
            if seq < 4:
                rfh.write(json.dumps({"seq": seq, "blocks": scorer.trace[:16]}) + "\n")
            rows.add(seq, toks[1:], -logp, -lm_logp.numpy(),
                     blocks_with_doc=sum(bool(t["docs"]) for t in scorer.trace),
                     dropped_own_doc=sum(t["dropped"] for t in scorer.trace))
            bar.update(1)
    summary = {**rows.summary(), "sequences": n}
    # cost beside the baseline's one forward of n-1 tokens per sequence
    summary["forward_tokens_per_token"] = scorer.forward_tokens / max(summary["tokens"], 1)
    summary["queries_per_token"] = scorer.queries / max(summary["tokens"], 1)
    (ctx.out_dir / "scores.json").write_text(json.dumps(
        {"settings": cfg.model_dump(mode="json"), "scores": summary}, indent=2))
    declare(ctx, cfg, "in-context-ralm")
    return summary
