"""RA-DIT's two fine-tuning stages.

`lsr`    retriever fine-tuning: top-k chunks per (x, y) with the initial query encoder, LM
         scores log p_LM(y | c∘x) computed once, then the query encoder (only) minimises
         KL(p_LSR ‖ p_R) over those chunks. The chunk embeddings and the index are read, never
         written. Artifact: `query_encoder/` (a Hugging Face encoder folder).
`ra-it`  LM fine-tuning: each example is repeated with each of its top-k chunks as
         "Background: ..." before the instruction, answer-only loss, on the training loop / Ray
         Train launcher of `components/training`. Artifact: a model directory like `instruct`'s.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from retro.components.devices import stage_device
from retro.components.radit.config import LSRConfig
from retro.components.radit.data import Example, load_examples
from retro.platform.errors import InputDataError, UserError
from retro.platform.registry import StrictModel
from retro.platform.spec.node import Node
from retro.platform.spec.types import DataPath
from retro.platform.stage import Slot, StageContext, StageParams, stage
import shutil
from retro.components.evaluators.lm import (RETRO_CONFIG, find_model_dir, find_tokenizer_dir,
                                            load_eval_lm)
from retro.components.evaluators.prompts import cut_tokens, with_background
from retro.components.instruct.render import encode, render
from retro.components.radit.lsr import (kl_loss, lm_scores, lsr_target, retriever_log_probs,
                                        retriever_scores)
from retro.components.radit.query_encoder import QueryEncoder
from retro.components.radit.scoring import answer_logprobs, render_rows
from retro.components.retrieval.api import Retriever
from retro.components.retrieval.common import build_component
from retro.components.training.data import GlobalBatchSampler, NpyRows
from retro.components.training.models import export, load_trained
from retro.components.training.stages import _run

QUERY_ENCODER = "query_encoder"


class HeldOutQuestions(StrictModel):
    """A QA evaluator's question set, which training must not see."""

    data_dir: DataPath
    datasets: list[str]
    limit: Optional[int] = None
    answer_in_corpus: bool = False


class _RetrieverParams(StageParams):
    retriever_type: str
    """The spec's `retriever.type` (dense for LSR)."""
    embedder: Optional[Node("embedder")] = None
    """Dense retrievers: the chunk/query encoder."""
    index: Optional[Node("index")] = None
    """Dense retrievers: the index (search settings, metric)."""
    exclude_questions: list[HeldOutQuestions] = []
    """QA evaluation sets kept out of training."""


class LsrParams(_RetrieverParams):
    lsr: LSRConfig
    """The recipe's LSR settings."""


class RaItParams(_RetrieverParams):
    instruct: Node("instruct")
    """An `ra-it` node."""


_DB = {"tokenizer": "the DB tokenizer (tokenizer)", "tokens": "document tokens (tokenize)",
       "chunk_db": "the chunk table (chunk-db)", "index": "the dense index (fill-index)"}


def _flat(params: StageParams) -> dict[str, Any]:
    """The params in the JSON form `build_retriever` and `load_examples` read."""
    return params.model_dump(mode="json")


# ------------------------------------------------------------------------------ shared pieces
def build_retriever(params: dict[str, Any], inputs: dict[str, Any]) -> Any:
    """The spec's retriever over the DB artifacts; a `query_encoder` input (an `lsr` artifact)
    replaces the embedder for queries only."""

    node = {"type": params["retriever_type"],
            **{k: params[k] for k in ("embedder", "index", "stopwords") if k in params}}
    encode = None
    if "query_encoder" in inputs:
        if "embedder" not in params:
            raise UserError("a query_encoder input needs a dense retriever (retriever.type is "
                            f"{params['retriever_type']!r})")
        encode = query_encoder_embedder(params["embedder"], inputs["query_encoder"]).embed
    return Retriever.from_artifacts(node, inputs, query_encoder=encode)


def query_encoder_embedder(embedder_node: dict[str, Any], artifact: Any) -> Any:
    """An `hf-mean-pool` embedder with the spec's pooling over a fine-tuned encoder folder."""

    folder = find_model_dir(Path(getattr(artifact, "path", artifact)))
    return build_component("embedder", {**embedder_node, "model": str(folder)})


def _retrieve(retriever: Any, examples: Sequence[Example], k: int
              ) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """Top-k chunk ids [n, k] (-1 = none), scores [n, k] and texts of each example's query."""
    hits = retriever.search([e.query for e in examples], k) if examples else []
    ids = np.full((len(examples), k), -1, dtype=np.int64)
    scores = np.zeros((len(examples), k), dtype=np.float32)
    texts = []
    for i, row in enumerate(hits):
        ids[i, :len(row)] = [p.chunk_id for p in row]
        scores[i, :len(row)] = [p.score for p in row]
        texts.append([p.text for p in row])
    return ids, scores, texts


def _load_lm(path: Path, threads: int, device: str = "cpu") -> Any:
    return load_eval_lm(path, threads=threads, device=device)


def _eod(tokenizer: Any) -> int:
    eod = tokenizer.eos_token_id
    if eod is None:
        raise InputDataError("the LM's tokenizer has no eos token: RA-DIT ends every answer "
                             "with it; save the tokenizer with an eos_token")
    return int(eod)


def _threads(ctx: Any) -> int:
    return max(1, int(ctx.resources.cpus_per_worker))


# ------------------------------------------------------------------------------ lsr
def _lsr_estimate(params: LsrParams) -> dict[str, Any]:
    n = params.lsr.examples + params.lsr.eval_examples
    return {"examples": n, "k": params.lsr.k, "lm_rows": n * params.lsr.k}


@stage("lsr", version="2", params=LsrParams, estimate=_lsr_estimate,
       inputs={"lm": "the LM that scores chunks (import-gguf, lm-folder)",
               "embeddings": "DB chunk embeddings (embed)", **_DB})
def lsr(ctx: StageContext[LsrParams]) -> dict[str, Any]:
    """Fine-tune the query encoder by LM-supervised retrieval (RA-DIT §2.4).

    Params: `lsr` (the recipe's LSR node), `retriever_type`, `embedder`, `index` (the spec's
    retriever), `exclude_questions` (QA evaluation sets kept out of training).
    Inputs: `lm` (a causal-LM folder, e.g. import-gguf), `embeddings` (embed), `tokenizer`,
    `tokens`, `chunk_db`, `index` (fill-index).
    Files: `query_encoder/` (save_pretrained), `examples.jsonl` (query, chunk ids, LM scores,
    p_LSR, p_R before / after), `lsr.json` (settings and results); loss curve in metrics.
    """
    import torch

    cfg, params = ctx.params.lsr, _flat(ctx.params)
    if params["retriever_type"] != "dense":
        raise UserError("lsr fine-tunes a dense query encoder; retriever.type is "
                        f"{params['retriever_type']!r}")
    torch.set_num_threads(_threads(ctx))
    train, held, info = load_examples(cfg.data, cfg.examples, cfg.eval_examples, ctx.seed,
                                      params["exclude_questions"])
    examples = train + held
    ids, _, texts = _retrieve(build_retriever(params, ctx.inputs), examples, cfg.k)
    logp, n_tok = _lm_scores(ctx, cfg, examples, ids, texts)
    mask = ids >= 0

    target = lsr_target(lm_scores(logp, n_tok, cfg.lm_score), cfg.tau, mask)
    docs = _doc_embeddings(ctx.inputs["embeddings"], ids)
    usable = mask.sum(1) >= 2                                # a softmax over one chunk is fixed
    n_train = len(train)
    tr = np.flatnonzero(usable[:n_train])
    ev = n_train + np.flatnonzero(usable[n_train:])
    if len(tr) == 0:
        raise InputDataError("lsr: no training example has 2 or more retrieved chunks")

    enc = QueryEncoder(params["embedder"], device=stage_device(ctx))
    metric = params["index"].get("metric", "ip")
    data = _LSRData([e.query for e in examples], docs, mask, target, metric)
    before, p_before = _evaluate(enc, cfg, data, tr, ev)
    losses = _train(ctx, cfg, enc, data, tr)
    after, p_after = _evaluate(enc, cfg, data, tr, ev)
    enc.save(ctx.out_dir / QUERY_ENCODER)
    _write_examples(ctx.out_dir / "examples.jsonl", examples, ids, logp, target, p_before,
                    p_after)
    tenth = max(1, len(losses) // 10)
    summary = {"examples": len(tr), "eval_examples": len(ev), "k": cfg.k, "steps": len(losses),
               "excluded_eval_questions": info["excluded"], "loss_first": losses[0],
               "loss_last": losses[-1], "loss_first_10pct": float(np.mean(losses[:tenth])),
               "loss_last_10pct": float(np.mean(losses[-tenth:])),
               **{f"{k}_before": v for k, v in before.items()},
               **{f"{k}_after": v for k, v in after.items()}}
    (ctx.out_dir / "lsr.json").write_text(json.dumps(
        {"settings": cfg.model_dump(mode="json"), "blend": info["blend"], "summary": summary},
        indent=2, default=str))
    return summary


class _LSRData:
    """Everything LSR trains on, row-aligned with the examples."""

    def __init__(self, queries: list[str], docs: np.ndarray, mask: np.ndarray,
                 target: np.ndarray, metric: str):
        self.queries, self.docs, self.mask, self.target, self.metric = (queries, docs, mask,
                                                                        target, metric)

    def batch(self, rows: np.ndarray) -> tuple[list[str], Any, Any, Any]:
        import torch

        return ([self.queries[i] for i in rows], torch.from_numpy(self.docs[rows]),
                torch.from_numpy(self.mask[rows]),
                torch.from_numpy(self.target[rows].astype(np.float32)))


def _lm_scores(ctx: Any, cfg: LSRConfig, examples: list[Example], ids: np.ndarray,
               texts: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """log p_LM(y | c∘x) summed over y [n, k] and y's token count; cached in the work dir."""

    cache = ctx.work_dir / "lm_scores.npz"
    if cache.exists():
        saved = np.load(cache)
        if np.array_equal(saved["ids"], ids):
            ctx.log.info("lsr: LM scores from the work dir (%d rows)", int((ids >= 0).sum()))
            return saved["logp"], saved["n_tokens"]
    lm = _load_lm(ctx.inputs["lm"].path, _threads(ctx), stage_device(ctx))
    tok = lm.tokenizer
    tokens, masks, cut = render_rows(examples, texts, tok, _eod(tok), cfg.max_tokens,
                                     cfg.system, cfg.max_tokens // 2)
    if cut:
        ctx.log.warning("lsr: %d scored rows exceed max_tokens=%d and lost their start",
                        cut, cfg.max_tokens)
    with ctx.progress(len(tokens), "lsr: LM scores") as bar:
        flat, count = answer_logprobs(lm.model, tokens, masks, cfg.lm_batch_size, bar.update)
    logp = np.zeros(ids.shape, dtype=np.float64)
    n_tok = np.zeros(ids.shape, dtype=np.int64)
    valid = ids >= 0          # render_rows walked the valid chunks in example-major order
    logp[valid], n_tok[valid] = flat, count
    np.savez(cache, ids=ids, logp=logp, n_tokens=n_tok)
    return logp, n_tok


def _doc_embeddings(artifact: Any, ids: np.ndarray) -> np.ndarray:
    """The stored chunk embeddings of `ids` [n, k, d] float32 (zeros where id = -1)."""
    emb = np.load(Path(artifact.path) / "embeddings.npy", mmap_mode="r")
    out = np.zeros((*ids.shape, emb.shape[1]), dtype=np.float32)
    valid = ids >= 0
    out[valid] = np.asarray(emb[ids[valid]], dtype=np.float32)
    return out


def _log_p_r(enc: Any, cfg: LSRConfig, data: _LSRData, rows: np.ndarray) -> tuple[Any, Any,
                                                                                   Any]:

    queries, *rest = data.batch(rows)
    docs, mask, target = (t.to(enc.device) for t in rest)     # where the encoder computes
    s = retriever_scores(enc(queries), docs, data.metric)
    return retriever_log_probs(s, cfg.retriever_temperature, mask), mask, target


def _train(ctx: Any, cfg: LSRConfig, enc: Any, data: _LSRData, rows: np.ndarray) -> list[float]:
    """AdamW on the query encoder; returns the loss of every step (also streamed)."""
    import torch


    torch.manual_seed(ctx.seed)
    batch = min(cfg.batch_size, len(rows))
    steps = max(1, math.ceil(cfg.epochs * len(rows) / batch))
    sampler = GlobalBatchSampler(len(rows), batch, ctx.seed)
    params = [p for p in enc.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    enc.train()
    losses = []
    for step in range(steps):
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr
        log_p, mask, target = _log_p_r(enc, cfg, data, rows[sampler.batch(step)])
        loss = kl_loss(target, log_p, mask, cfg.kl)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
        opt.step()
        losses.append(float(loss.detach()))
        ctx.log_metrics(step=step + 1, loss=losses[-1], lr=lr, grad_norm=float(norm))
    enc.train(False)
    ctx.log.info("lsr: %d steps, loss %.4f -> %.4f", steps, losses[0], losses[-1])
    return losses


def _evaluate(enc: Any, cfg: LSRConfig, data: _LSRData, train: np.ndarray, held: np.ndarray
              ) -> tuple[dict[str, float], np.ndarray]:
    """KL and top-1 agreement (argmax p_R = argmax p_LSR) on the training and held-out rows,
    dropout off; also p_R of every example [n, k] (NaN for unusable ones)."""
    import torch


    enc.train(False)
    p_r = np.full(data.mask.shape, np.nan)
    metrics: dict[str, float] = {}
    for name, rows in (("train", train), ("eval", held)):
        if not len(rows):
            continue
        kl, agree = 0.0, []
        with torch.no_grad():
            for a in range(0, len(rows), 64):
                part = rows[a:a + 64]
                log_p, mask, target = _log_p_r(enc, cfg, data, part)
                kl += float(kl_loss(target, log_p, mask, cfg.kl)) * len(part)
                agree += (log_p.argmax(-1) == target.argmax(-1)).tolist()
                p_r[part] = log_p.exp().cpu().numpy()
        metrics[f"{name}_kl"] = kl / len(rows)
        metrics[f"{name}_top1_agreement"] = 100.0 * float(np.mean(agree))
    return metrics, p_r


def _write_examples(path: Path, examples: list[Example], ids: np.ndarray, logp: np.ndarray,
                    target: np.ndarray, p_before: np.ndarray, p_after: np.ndarray) -> None:
    def r(x: np.ndarray) -> list:
        return [None if v != v else round(float(v), 4) for v in x]

    with open(path, "w") as fh:
        for i, ex in enumerate(examples):
            fh.write(json.dumps({
                "query": ex.query, "answer": ex.turns[-1][1], "where": ex.where,
                "chunk_ids": ids[i].tolist(), "lm_logprob": r(logp[i]), "p_lsr": r(target[i]),
                "p_r_before": r(p_before[i]), "p_r_after": r(p_after[i])}) + "\n")



# ------------------------------------------------------------------------------ ra-it
@stage("ra-it", version="2", params=RaItParams, distributed=True,
       inputs={"init": "the LM to tune (import-gguf, lm-folder, or a trained model)", **_DB,
               "query_encoder": Slot("a fine-tuned query encoder to retrieve with (lsr)",
                                     optional=True)})
def ra_it(ctx: StageContext[RaItParams]) -> dict[str, Any]:
    """Retrieval-augmented instruction tuning of the `init` LM (RA-DIT §2.3).

    Params: `instruct` (an `ra-it` node), `retriever_type`, `embedder`, `index`,
    `exclude_questions`. Inputs: `init` (a causal-LM folder or a trained retro model
    directory), `tokenizer`, `tokens`, `chunk_db`, `index` (the DB), optional `query_encoder`
    (an `lsr` artifact: retrieve with the fine-tuned query encoder).
    Files: the model directory (`training.models.export`: decoder/ + tokenizer,
    retro_config.json, training.json), `retrieved.jsonl` (each example's chunks).
    """

    cfg, params = ctx.params.instruct, _flat(ctx.params)
    sched = cfg.schedule()
    n_examples = math.ceil(sched.steps * sched.global_batch / cfg.retrieve_k)
    train, held, info = load_examples(cfg.blend, n_examples, cfg.eval_samples, ctx.seed,
                                      params["exclude_questions"])
    retriever = build_retriever(params, ctx.inputs)
    init = Path(ctx.inputs["init"].path)
    tok, tok_dir = _lm_tokenizer(init, ctx.work_dir / "tokenizer")
    data = ctx.work_dir / "rows"
    data.mkdir(parents=True, exist_ok=True)
    parts = {"train": train, "eval": held}
    hits = {w: _retrieve(retriever, exs, cfg.retrieve_k) for w, exs in parts.items()}
    seq_length = cfg.seq_length or min(
        max(_row_width(exs, hits[w][2], tok, cfg) for w, exs in parts.items()),
        _context_length(init))
    stats = {w: _write_rows(data / w, exs, hits[w][2], tok, seq_length, cfg)
             for w, exs in parts.items()}
    _write_retrieved(ctx.out_dir / "retrieved.jsonl", train, *hits["train"][:2])
    rows = {w: NpyRows(str(data / f"{w}_tokens.npy"), seq_length,
                       loss_mask=str(data / f"{w}_mask.npy"), pad_id=_eod(tok))
            for w in parts if stats[w]["rows"]}
    meta = {"stage": "ra-it", "schedule": sched.__dict__, "seed": ctx.seed,
            "seq_length": seq_length, "retrieve_k": cfg.retrieve_k, "blend": info["blend"],
            "rows": stats, "query_encoder": "query_encoder" in ctx.inputs}
    ctx.summary["blend"] = info["blend"]
    ctx.log.info("ra-it: %d examples x %d chunks = %d rows of %d tokens (%d truncated)",
                 len(train), cfg.retrieve_k, stats["train"]["rows"], seq_length,
                 stats["train"]["truncated"])
    model = functools.partial(load_lm_for_training, str(init))
    out = functools.partial(export, tokenizer_dir=str(tok_dir), meta=meta)
    summary = _run(ctx, "ra-it", model, rows["train"], rows.get("eval"), sched, cfg, {},
                   export=out)
    return {**summary, "examples": len(train), "rows": stats["train"]["rows"],
            "truncated": stats["train"]["truncated"], "seq_length": seq_length,
            "loss_tokens": stats["train"]["loss_tokens"],
            "excluded_eval_questions": info["excluded"]}


def load_lm_for_training(path: str) -> Any:
    """The LM to fine-tune, every decoder weight trainable: a transformers causal LM folder is
    wrapped as a plain (retro: false) `RetroForCausalLM`, so `training.models.export` and the
    evaluators load the result; a retro model directory keeps its encoder, gated off."""
    import torch
    from transformers import AutoModelForCausalLM

    from retro.components.models.retro import RetroConfig, RetroForCausalLM

    folder = find_model_dir(Path(path))
    if (folder / RETRO_CONFIG).exists():
        return load_trained(str(folder), retrieval=False)
    decoder = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                   attn_implementation="sdpa")
    model = RetroForCausalLM(RetroConfig(decoder=decoder.config.to_dict(), retro=False),
                             decoder=decoder)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _lm_tokenizer(init: Path, out: Path) -> tuple[Any, Path]:
    """The LM's tokenizer, and a folder holding only its files (what export copies)."""
    from transformers import AutoTokenizer


    tok = AutoTokenizer.from_pretrained(find_tokenizer_dir(init))
    tok.save_pretrained(str(out))
    return tok, out


def _context_length(init: Path) -> int:
    folder = find_model_dir(init)
    cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() \
        else json.loads((folder / "retro_config.json").read_text())["decoder"]
    n = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    if not n:
        raise UserError("instruct.seq_length: the LM does not state its context length; set it")
    return int(n)


def _rendered(ex: Example, chunk: str, tok: Any, cfg: Any) -> list[tuple[str, str]]:
    return with_background(ex.turns, cut_tokens(tok, chunk, cfg.max_background_tokens))


def _row_width(examples: list[Example], texts: list[list[str]], tok: Any, cfg: Any) -> int:
    """Tokens the longest (chunk, example) row needs, EOD included, rounded up to 8."""

    width = 8
    for ex, chunks in zip(examples, texts):
        for chunk in chunks:
            prompt, answer = render(_rendered(ex, chunk, tok, cfg), cfg.system)
            n = len(tok.encode(prompt, add_special_tokens=False)) + \
                len(tok.encode(answer, add_special_tokens=False)) + 1
            width = max(width, -(-n // 8) * 8)
    return width


def _write_rows(out: Path, examples: list[Example], texts: list[list[str]], tok: Any,
                seq_length: int, cfg: Any) -> dict[str, int]:
    """`<out>_tokens.npy` / `<out>_mask.npy`: one row per (example, chunk), answer-only mask."""

    tokenize = functools.partial(tok.encode, add_special_tokens=False)
    toks, masks, cut = [], [], 0
    for ex, chunks in zip(examples, texts):
        for chunk in chunks:
            t, m, c = encode(_rendered(ex, chunk, tok, cfg), tokenize, _eod(tok), seq_length,
                             cfg.system)
            toks.append(t)
            masks.append(m)
            cut += int(c)
    width = seq_length + 1
    np.save(f"{out}_tokens.npy", np.stack(toks) if toks else np.zeros((0, width), np.int32))
    np.save(f"{out}_mask.npy", np.stack(masks) if masks else np.zeros((0, width), np.uint8))
    return {"rows": len(toks), "truncated": cut,
            "loss_tokens": int(sum(int(m.sum()) for m in masks))}


def _write_retrieved(path: Path, examples: list[Example], ids: np.ndarray,
                     scores: np.ndarray) -> None:
    with open(path, "w") as fh:
        for ex, row, sc in zip(examples, ids, scores):
            fh.write(json.dumps({"query": ex.query, "where": ex.where, "chunk_ids": row.tolist(),
                                 "scores": np.round(sc, 4).tolist()}) + "\n")


# ------------------------------------------------------------------------------ lm-folder
class LmFolderParams(StageParams):
    path: DataPath
    """`model.init`: a transformers causal-LM folder with its tokenizer."""


@stage("lm-folder", version="2", params=LmFolderParams)
def lm_folder(ctx: StageContext[LmFolderParams]) -> dict[str, Any]:
    """The base LM from a local folder (`model.init`): a transformers causal LM with its
    tokenizer, copied into the store so every consumer reads one artifact.

    Params: `path` (model.init). Files: the folder's files (config.json, weights, tokenizer).
    """

    src = Path(ctx.params.path)
    if not (src / "config.json").is_file():
        raise InputDataError(f"model.init: {src} is not a transformers model folder (no "
                             "config.json); save the LM with save_pretrained, tokenizer included")
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != "manifest.json":
            shutil.copy2(f, ctx.out_dir / f.name)
    return {"files": len(list(ctx.out_dir.iterdir())), "source": str(src)}
