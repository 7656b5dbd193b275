"""The `eval-knnlm` stage: kNN-LM perplexity of a frozen LM over a `knn-datastore`.

Per batch of held-out sequences: one LM forward gives log p_LM and the query keys (the
datastore's key type, `keys.forward_keys`); the faiss index returns the k nearest keys;
with `recompute_distances` their squared L2 to the query is recomputed from the stored keys
(urvashik/knnlm's default `knn_sim_func=None`: `-sum((q - k)^2)` over `self.keys[knns]`;
knn-transformers `recompute_dists`), else the index's distances are used (PQ-approximate for
PQ factories, knn-transformers' default). Neighbours from the evaluated sequence's documents
are dropped (none are in the DB for the valid split: the check costs nothing and makes a
train-split eval honest). Then `knn.interpolate` (log space).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from retro.components.devices import stage_device
from retro.components.evaluators.ablation import EvalParams, evaluator_settings
from retro.components.knnlm import knn
from retro.platform.spec.node import Node
from retro.platform.stage import StageContext, stage
from retro.components.evaluators.lm import load_eval_lm
from retro.components.knnlm.datastore import Datastore, check_plain_lm
from retro.components.knnlm.keys import forward_keys
from retro.components.knnlm.scoring import SequenceRows, check_vocab, declare
from retro.components.precision import inference_autocast, stage_precision
from retro.components.retrieval.api import Sequences, load_tokenizer
from retro.components.retrieval.common import build_component
from retro.components.retrieval.faiss_index import FILLED
from retro.platform.errors import UserError

_GATHER_FLOATS = 1 << 24   # query block: at most this many gathered key floats at once


class EvalKnnParams(EvalParams):
    index: Node("index")
    """The datastore's index node (its query params: nprobe, ef_search; its metric)."""


@stage("eval-knnlm", version="2", params=EvalKnnParams,
       inputs={"model": "the frozen LM (the one the datastore was built with)",
               "sequences": "held-out sequences (sequences-valid)",
               "tokenizer": "the DB tokenizer, for bytes (tokenizer)",
               "datastore": "keys, values, documents (knn-datastore)",
               "index": "the filled faiss index over the keys (fill-index)"},
       estimate=lambda p: {"k": p.evaluator.k, "lambda": p.evaluator.lmbda,
                           "exact": p.evaluator.recompute_distances})
def eval_knnlm(ctx: StageContext[EvalKnnParams]) -> dict[str, Any]:
    """kNN-LM and base-LM perplexity of the same tokens `eval-ppl` scores.

    Params: `evaluator` (the knn-lm node), `index` (its index node). Inputs: `model`,
    `sequences`, `tokenizer`, `datastore`, `index`.
    Writes: per_sequence.jsonl ({seq, nll, lm_nll, tokens, bytes, text_nll, lm_text_nll,
    target_in_knn}), scores.json, results.json.
    """
    import torch


    cfg = evaluator_settings(ctx.params)
    seqs = Sequences(ctx.inputs["sequences"])
    store = Datastore(ctx.inputs["datastore"])
    index_spec = build_component("index", ctx.params.index)
    index = index_spec.read(ctx.inputs["index"].path / FILLED)
    if index.ntotal != len(store):
        raise UserError(f"stage {ctx.name}: the index holds {index.ntotal} keys but the "
                        f"datastore {len(store)}; build the index from this datastore")
    tokenizer = load_tokenizer(ctx.inputs["tokenizer"])
    device = stage_device(ctx)
    lm = load_eval_lm(ctx.inputs["model"].path, ctx.inputs["tokenizer"].path,
                      threads=max(1, int(ctx.resources.cpus_per_worker)), device=device)
    check_plain_lm(lm, ctx.name)
    check_vocab(lm, tokenizer, ctx.name)
    precision = stage_precision(ctx, cfg.precision, device)
    if precision != store.meta.get("precision", precision):
        ctx.log.warning("queries in %s, datastore keys in %s", precision, store.meta["precision"])
    searcher = KnnSearcher(index, store, index_spec.config.metric, cfg)
    n = min(len(seqs), cfg.max_sequences or len(seqs))
    rows = SequenceRows(ctx.out_dir, tokenizer)
    hits = 0
    with ctx.progress(n, ctx.name) as bar:
        for start in range(0, n, cfg.batch_size):
            batch = np.arange(start, min(n, start + cfg.batch_size))
            toks = torch.from_numpy(np.asarray(seqs.tokens[batch], dtype=np.int64))
            with ctx.timer("forward"), inference_autocast(lm.model.decoder, precision, device):
                queries, logp = forward_keys(lm.model.decoder, toks[:, :-1], store.meta["key"])
            targets = toks[:, 1:]
            lm_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double().numpy()
            for i, seq in enumerate(batch):
                with ctx.timer("search"):
                    knn_logp, found = searcher.target_log_probs(
                        queries[i].numpy(), targets[i].numpy(), seqs.docs(int(seq)))
                mixed = knn.interpolate(lm_logp[i], knn_logp, cfg.lmbda, found)
                in_knn = int(np.isfinite(knn_logp).sum())
                hits += in_knn
                rows.add(seq, targets[i].numpy(), -mixed, -lm_logp[i], target_in_knn=in_knn)
            bar.update(len(batch))
    summary = {**rows.summary(), "sequences": n, "datastore": len(store),
               "target_in_knn": hits / max(rows.totals["tokens"], 1),
               # cost beside the baseline's forward: one search per token, k key reads
               "searches_per_token": 1.0,
               "key_reads_per_token": float(min(cfg.k, len(store))
                                            if cfg.recompute_distances else 0),
               "datastore_bytes": int(sum(f.stat().st_size for f in store.path.glob("*.npy")))}
    (ctx.out_dir / "scores.json").write_text(json.dumps(
        {"settings": cfg.model_dump(mode="json"), "scores": summary}, indent=2))
    declare(ctx, cfg, "knn-lm")
    return summary


class KnnSearcher:
    """k nearest datastore keys of query vectors, their distances and log p_kNN(target)."""

    def __init__(self, index: Any, store: Any, metric: str, cfg: Any):
        self.index, self.store, self.metric, self.cfg = index, store, metric, cfg

    def neighbours(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distances [m, k], ids [m, k]); ids -1 where the index has fewer hits. Distances:
        squared L2 (l2) or negated inner product (ip), exact when `recompute_distances`."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(self.cfg.k, len(self.store))
        dim = q.shape[1]
        out_d, out_i = [], []
        block = max(1, _GATHER_FLOATS // (k * dim))
        for a in range(0, len(q), block):
            d, ids = self.index.search(q[a:a + block], k)
            if self.cfg.recompute_distances:
                stored = self.store.keys[np.clip(ids, 0, None).reshape(-1)]
                stored = stored.reshape(*ids.shape, dim).astype(np.float32)
                d = knn.exact_distances(q[a:a + block], stored) if self.metric == "l2" else \
                    -(stored * q[a:a + block, None, :]).sum(-1)
            elif self.metric != "l2":
                d = -d
            out_d.append(d)
            out_i.append(ids)
        return np.concatenate(out_d), np.concatenate(out_i)

    def target_log_probs(self, queries: np.ndarray, targets: np.ndarray,
                         exclude_docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(log p_kNN(target) [m], has-neighbours mask [m]), neighbours from `exclude_docs`
        (the evaluated sequence's documents) dropped."""
        dists, ids = self.neighbours(queries)
        safe = np.clip(ids, 0, None)
        valid = (ids >= 0) & ~np.isin(np.asarray(self.store.docs[safe.reshape(-1)])
                                      .reshape(ids.shape), exclude_docs)
        values = np.asarray(self.store.values[safe.reshape(-1)]).reshape(ids.shape)
        logp = knn.knn_target_log_probs(dists, values, targets, self.cfg.temperature, valid)
        return logp, valid.any(axis=1)
