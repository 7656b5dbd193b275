"""The `joint-train` stage: a reader LM and a MiniLM dual encoder trained in the same steps.

Each step (REALM / Atlas):
  1. swap in a finished refresh, if one came back (between steps: `LiveIndex.swap`);
  2. top-k chunks per question from the live (possibly stale) index with the current query tower;
  3. the LM reads each (chunk, x, y) row: reader loss (REPLUG ensemble or per-row NLL) with
     gradient into the LM; the same pass's answer log-probs, detached, are the retriever's
     target (PDist) or mixture weights (EMDR²), against p_R from the current towers (the
     document tower re-embeds the k chunks with gradient, as Atlas does when it trains);
  4. every `refresh.check_every` steps, staleness recall@k of the live index on the fixed probe
     set; `should_refresh` decides; a refresh is submitted to the actor and training goes on.
Checkpoints (`resources.checkpoint_interval`) hold the models, optimizers, the digest of the
index in use and any refresh in flight (its encoder state), so a resumed stage searches the index
it last used and resubmits the refresh, whose finished shards are reused.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from retro.components.devices import stage_device
from retro.components.joint.config import Arm, JointConfig, arm_config
from retro.components.joint.losses import (emdr2_loss, pdist_loss, reader_loss,
                                           retriever_log_probs, retriever_scores,
                                           sequence_scores)
from retro.components.joint.reader import align_y, render_example, token_logprobs
from retro.components.radit.stages import HeldOutQuestions
from retro.platform.errors import InputDataError, UserError
from retro.platform.spec.node import Node
from retro.platform.stage import Slot, StageContext, StageParams, stage

CHECKPOINT = "checkpoint.pt"
QUERY_ENCODER, DOC_ENCODER, INDEX_DIR = "query_encoder", "doc_encoder", "index"


class JointTrainParams(StageParams):
    joint: JointConfig
    """The recipe's `joint` node."""
    arm: Arm = "as-written"
    """Which comparison arm (config.ARMS) this call is: its refresh policy / retriever loss."""
    every: Optional[int] = None
    """The `every` arm's refresh interval (steps)."""
    retriever_type: str
    """The spec's `retriever.type` (dense)."""
    embedder: Optional[Node("embedder")] = None
    """The MiniLM encoder both towers start from (an `hf-mean-pool` node)."""
    index: Optional[Node("index")] = None
    """The faiss index settings of every refreshed index (factory, metric)."""
    exclude_questions: list[HeldOutQuestions] = []
    """QA evaluation sets kept out of training."""


def _estimate(p: JointTrainParams) -> dict[str, Any]:
    cfg = arm_config(p.joint, p.arm, p.every)
    return {"arm": p.arm, "policy": cfg.refresh.policy, "steps": cfg.steps,
            "lm_rows": cfg.steps * cfg.batch_size * cfg.k}


@stage("joint-train", version="1", params=JointTrainParams, estimate=_estimate,
       inputs={"lm": "the reader LM to tune (import-gguf, lm-folder)",
               "embeddings": Slot("the DB's chunk embeddings (embed): the initial index when "
                                  "the towers start from the same encoder", optional=True),
               "tokenizer": "the DB tokenizer (tokenizer)", "tokens": "document tokens (tokenize)",
               "chunk_db": "the chunk table (chunk-db)"})
def joint_train(ctx: StageContext[JointTrainParams]) -> dict[str, Any]:
    """Train the reader and the retriever together over an asynchronously refreshed index.

    Params: `joint` (recipe.joint), `arm`, `every`, `retriever_type`, `embedder`, `index`,
    `exclude_questions`. Inputs: `lm` (a causal-LM folder), `tokenizer`, `tokens`, `chunk_db`,
    optional `embeddings` (embed: seeds the initial index instead of re-embedding the corpus).
    Files: the tuned LM at the root (config.json, weights, tokenizer: what eval-qa loads),
    `query_encoder/`, `doc_encoder/`, `index/` (the final index: embeddings.npy, index.faiss,
    meta.json), `refreshes.jsonl`, `staleness.jsonl`, `joint.json`, `joint.png` (loss and
    staleness over steps, refreshes marked); metrics stream loss / staleness per step.
    """
    params = ctx.params
    if params.retriever_type != "dense" or params.embedder is None:
        raise UserError("joint-train trains a dense dual encoder: set retriever.type: dense "
                        "with an hf-mean-pool embedder")
    cfg = arm_config(params.joint, params.arm, params.every)
    return JointTrainer(ctx, cfg).run()


class JointTrainer:
    """One joint run (state lives here so a checkpoint can capture all of it)."""

    def __init__(self, ctx: StageContext[JointTrainParams], cfg: JointConfig):
        self.ctx, self.cfg = ctx, cfg
        self.embedder_node = ctx.params.embedder.model_dump(mode="json")
        index = ctx.params.index.model_dump(mode="json") if ctx.params.index else {}
        self.metric = index.get("metric", "ip")
        self.factory = index.get("factory", "Flat")
        self.trains_retriever = cfg.retriever_loss != "none"
        self.trains_docs = self.trains_retriever and cfg.refresh.trains_doc_encoder
        self.history: dict[str, list] = {"steps": [], "staleness": [], "refreshes": [],
                                         "submitted": []}

    # -------------------------------------------------------------------------- setup
    def _setup(self) -> None:
        import torch

        from retro.components.joint.live_index import LiveIndex
        from retro.components.joint.refresh import IndexRefresher
        from retro.components.radit.data import load_examples
        from retro.components.radit.query_encoder import QueryEncoder
        from retro.components.retrieval.chunking import ChunkDB, raw_tokenizer

        ctx, cfg = self.ctx, self.cfg
        self.threads = max(1, int(ctx.resources.cpus_per_worker))
        torch.set_num_threads(self.threads)
        exclude = [e.model_dump(mode="json") for e in ctx.params.exclude_questions]
        self.train, _, info = load_examples(cfg.data, cfg.examples, 0, ctx.seed, exclude)
        self.blend_info = info
        db = ChunkDB(ctx.inputs["chunk_db"].path, ctx.inputs["tokens"].path)
        self.corpus = db.texts(0, db.n_chunks, raw_tokenizer(ctx.inputs["tokenizer"].path))
        if db.n_chunks < cfg.k:
            raise InputDataError(f"recipe.joint.k = {cfg.k} but the DB has {db.n_chunks} chunks")
        self.device = stage_device(ctx)        # towers and reader; faiss and numpy stay on CPU
        self.q = QueryEncoder(self.embedder_node, device=self.device)
        self.d = QueryEncoder(self.embedder_node, device=self.device)
        for p in self.d.parameters():
            p.requires_grad_(self.trains_docs)
        for p in self.q.parameters():
            p.requires_grad_(self.trains_retriever)
        self.lm, self.tok = self._load_lm()
        self.eod = self.tok.eos_token_id
        if self.eod is None:
            raise InputDataError("the reader's tokenizer has no eos token (it ends every answer)")
        emb = self.q.embedder.config
        corpus_digest = ":".join(ctx.inputs[s].key for s in ("tokenizer", "tokens", "chunk_db"))
        self.root = ctx.work_dir / "indexes"
        self.refresher = IndexRefresher(
            self.root, self.corpus, corpus_digest, self.q.embedder.path,
            max_length=emb.max_length, batch_size=emb.batch_size, sort_window=emb.sort_window,
            normalize=emb.normalize, exclude_special_tokens=emb.exclude_special_tokens,
            precision=emb.precision, factory=self.factory, metric=self.metric,
            shards=cfg.refresh.shards, threads=cfg.refresh_threads)
        params = [p for p in self.lm.parameters() if p.requires_grad]
        self.lm_opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) \
            if params else None
        ret = [p for m in (self.q, self.d) for p in m.parameters() if p.requires_grad]
        self.ret_opt = torch.optim.AdamW(ret, lr=cfg.retriever_lr,
                                         weight_decay=cfg.weight_decay) if ret else None
        self.start, self.pending_state = 0, None
        ckpt = ctx.work_dir / CHECKPOINT
        if ckpt.exists():
            self._resume(torch.load(ckpt, weights_only=False, map_location=self.device))
            self._trim_metrics()
            self.live = LiveIndex.load(self.root, self.index_digest)
            ctx.log.info("joint: resumed at step %d with index %s", self.start,
                         self.index_digest[:12])
            if self.pending_state is not None:            # a refresh was in flight: resubmit
                self.refresher.submit(self.pending_state["state"], self.pending_state["step"])
        else:
            t0 = time.time()
            snap = self._seed_initial() or self.refresher.build_now(self.d.model.state_dict(), 0)
            self.initial = {"digest": snap.digest, "seconds": time.time() - t0,
                            "meta": snap.meta}
            self.live = LiveIndex(snap)
            self.last_refresh_step = 0
            ctx.log.info("joint: initial index %s, %d chunks in %.1fs", snap.digest[:12],
                         len(self.corpus), time.time() - t0)
        self._probe()

    def _seed_initial(self) -> Any:
        """The initial snapshot from the DB's `embed` output when that is what a refresh of the
        untrained document tower would write (float32 vectors of this corpus from the same
        encoder and settings: the refresher reproduces the embed stage bit for bit), so no arm
        pays a full re-embedding before its first step. None: build it."""
        from retro.components.joint.live_index import EMBEDDINGS, INDEX, META, IndexSnapshot
        from retro.components.joint.refresh import write_index
        from retro.platform.store import write_json_atomic

        art = self.ctx.inputs.get("embeddings")
        if art is None:
            return None
        emb = np.load(Path(art.path) / "embeddings.npy", mmap_mode="r")
        if emb.dtype != np.float32 or emb.shape[0] != len(self.corpus):
            return None
        probe = self._embed(self.d, self.corpus[:8])          # same encoder? (cheap check)
        if not np.allclose(probe, emb[:8], atol=1e-4):
            self.ctx.log.warning("joint: the DB embeddings are not the document tower's; "
                                 "building the initial index")
            return None
        digest = self.refresher.digest(self.d.model.state_dict())
        out = self.root / digest
        if not IndexSnapshot.complete(self.root, digest):
            out.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            shutil.copyfile(Path(art.path) / "embeddings.npy", out / EMBEDDINGS)
            write_index(out / INDEX, np.asarray(emb), self.factory, self.metric)
            write_json_atomic(out / META, {
                "digest": digest, "step": 0, "n_docs": int(emb.shape[0]),
                "dim": int(emb.shape[1]), "factory": self.factory, "metric": self.metric,
                "seeded_from": f"embed/{art.key}", "shards": 0, "shards_reused": 0,
                "seconds": round(time.time() - t0, 4), "started_at": t0,
                "finished_at": time.time()})
        return IndexSnapshot.open(self.root, digest)

    def _load_lm(self) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from retro.components.evaluators.lm import find_model_dir, find_tokenizer_dir

        root = Path(self.ctx.inputs["lm"].path)
        folder = find_model_dir(root)
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                  attn_implementation="sdpa").to(self.device)
        for p in lm.parameters():
            p.requires_grad_(self.cfg.train_lm)
        return lm, AutoTokenizer.from_pretrained(find_tokenizer_dir(folder, root))

    def _probe(self) -> None:
        from retro.components.joint.staleness import StalenessProbe

        cfg = self.cfg.refresh
        queries = [e.query for e in self.train]
        _, top = self.live.search(self._embed(self.q, queries), min(cfg.probe_k,
                                                                    len(self.corpus)))
        self.probe = StalenessProbe.build(queries, self.corpus, cfg, gold=top.tolist(),
                                          seed=self.ctx.seed, metric=self.metric)

    # -------------------------------------------------------------------------- encoders
    @staticmethod
    def _embed(tower: Any, texts: list[str]) -> np.ndarray:
        """Embeddings as the refresher computes them (the embedder's windows and precision)
        with the tower's current weights, dropout off."""
        was = tower.model.training
        tower.model.train(False)
        tower.embedder._bf16 = None                # a bf16 copy would hold old weights
        try:
            return tower.embedder.embed(list(texts))
        finally:
            tower.model.train(was)

    # -------------------------------------------------------------------------- loop
    def run(self) -> dict[str, Any]:
        import torch

        self._setup()
        ctx, cfg = self.ctx, self.cfg
        from retro.components.training.data import GlobalBatchSampler

        sampler = GlobalBatchSampler(len(self.train), min(cfg.batch_size, len(self.train)),
                                     ctx.seed)
        interval = ctx.resources.checkpoint_interval
        t_train = time.time()
        try:
            for step in range(self.start, cfg.steps):
                self._swap_if_ready(step)
                torch.manual_seed(ctx.seed * 100_003 + step)   # dropout: same on a resume
                row = self._step(step, [self.train[i] for i in sampler.batch(step)])
                stale = self._check(step + 1)
                self._maybe_refresh(step + 1, stale)
                row["in_flight_after"] = self.refresher.in_flight()
                self.history["steps"].append(row)
                ctx.log_metrics(step=step + 1, **{k: v for k, v in row.items()
                                                  if isinstance(v, (int, float))})
                if (step + 1) % interval == 0 and step + 1 < cfg.steps:
                    self._checkpoint(step + 1)
            train_seconds = time.time() - t_train
            final = self._finish()
        finally:
            self.refresher.close()
        return self._write(final, train_seconds)

    def _step(self, step: int, batch: list) -> dict[str, Any]:
        import torch

        cfg = self.cfg
        t0 = time.time()
        lr_scale = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
        for opt, lr in ((self.lm_opt, cfg.lr), (self.ret_opt, cfg.retriever_lr)):
            if opt is not None:
                for g in opt.param_groups:
                    g["lr"] = lr * lr_scale
        queries = [e.query for e in batch]
        scores, ids, snap = self.live.search_with_snapshot(self._embed(self.q, queries), cfg.k)
        t_search = time.time()
        mask = torch.as_tensor(ids >= 0, device=self.device)
        texts = [[self.corpus[i] if i >= 0 else "" for i in row] for row in ids]
        log_p_r = self._retriever_log_probs(queries, texts, ids, scores, mask)
        b, k = ids.shape
        r_total, y_lp, y_m, trunc = 0.0, [], [], 0
        self.lm.train(cfg.train_lm)
        for i, ex in enumerate(batch):
            valid = [t for t, ok in zip(texts[i], mask[i].tolist()) if ok]
            rows = render_example(ex, valid, self.tok, self.eod, cfg.max_tokens, cfg.system,
                                  cfg.max_background_tokens)
            trunc += rows.truncated
            with torch.set_grad_enabled(cfg.train_lm):
                logp, lmask, ymask = token_logprobs(self.lm, rows)
                logp, lmask, ymask = (_pad_rows(t, k) for t in (logp, lmask, ymask))
                loss = reader_loss(logp[None], lmask[None], mask[i:i + 1], cfg.reader,
                                   log_p_r[i:i + 1] if cfg.reader == "replug" else None) / b
            if cfg.train_lm:
                loss.backward()
            r_total += float(loss.detach())
            lp, m = align_y(logp.detach(), ymask)
            y_lp.append(lp)
            y_m.append(m)
        t_lm = time.time()
        width = max(x.shape[1] for x in y_lp)
        y_lp = torch.stack([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in y_lp])
        y_m = torch.stack([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in y_m])
        ret = self._retriever_loss(log_p_r, y_lp, y_m, mask)
        if ret is not None and ret.requires_grad:
            ret.backward()
        norms = self._optimizer_step()
        with torch.no_grad():
            agree = (log_p_r.argmax(-1) == sequence_scores(y_lp, y_m, cfg.lm_score)
                     .masked_fill(~mask, float("-inf")).argmax(-1)).float().mean()
        ret_v = float(ret.detach()) if ret is not None else 0.0
        return {"loss": r_total + ret_v, "reader_loss": r_total, "retriever_loss": ret_v,
                "top1_agreement": float(agree), "index_step": snap.step,
                "index_age": step + 1 - snap.step, "truncated_rows": trunc,
                "t_start": t0, "t_end": time.time(), "search_s": t_search - t0,
                "lm_s": t_lm - t_search, "lr": cfg.lr * lr_scale, **norms,
                "index_digest": snap.digest}

    def _retriever_log_probs(self, queries: list[str], texts: list[list[str]], ids: np.ndarray,
                             scores: np.ndarray, mask: Any) -> Any:
        """log p_R over each question's k chunks from the current towers (with gradient into
        the towers that train); the index's own scores when the retriever is frozen."""
        import torch

        cfg = self.cfg
        if not self.trains_retriever:
            s = torch.as_tensor(scores, dtype=torch.float32, device=self.device)
            if self.metric == "l2":
                s = -s                                   # faiss L2: squared distance
            return retriever_log_probs(s, cfg.retriever_temperature, mask)
        self.q.train(True)
        qv = self.q(queries)                                           # [b, d]
        if self.trains_docs:
            self.d.train(True)
            flat = [t for row in texts for t in row]
            dv = self.d(flat).reshape(len(texts), -1, qv.shape[-1])    # [b, k, d]
        else:
            emb = self.live.snapshot.embeddings()
            dv = torch.as_tensor(np.asarray(emb[np.maximum(ids, 0)], dtype=np.float32),
                                 device=self.device)
        s = retriever_scores(qv, dv, self.metric)
        return retriever_log_probs(s, cfg.retriever_temperature, mask)

    def _retriever_loss(self, log_p_r: Any, y_lp: Any, y_m: Any, mask: Any) -> Any:
        cfg = self.cfg
        if cfg.retriever_loss == "pdist":
            return pdist_loss(log_p_r, sequence_scores(y_lp, y_m, cfg.lm_score), mask, cfg.tau,
                              cfg.kl)
        if cfg.retriever_loss == "emdr2":
            return emdr2_loss(log_p_r, y_lp, y_m, mask, cfg.emdr_marginal)
        return None

    def _optimizer_step(self) -> dict[str, float]:
        import torch

        out = {}
        for name, opt in (("lm", self.lm_opt), ("retriever", self.ret_opt)):
            if opt is None:
                continue
            params = [p for g in opt.param_groups for p in g["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip or float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            out[f"{name}_grad_norm"] = float(norm)
        return out

    # -------------------------------------------------------------------------- refresh
    def _swap_if_ready(self, step: int) -> None:
        snap = self.refresher.poll()
        if snap is None:
            return
        old = self.live.snapshot
        self.live.swap(snap)
        self._record_refresh(snap, step + 1, old.digest)
        self.ctx.log.info("joint: step %d swapped in index %s (encoder of step %d, %.1fs)",
                          step + 1, snap.digest[:12], snap.step, snap.meta.get("seconds", 0))

    def _record_refresh(self, snap: Any, swapped_before: Optional[int], replaced: str) -> None:
        """A finished refresh: swapped in before step `swapped_before` (None: it came back
        after the last step and was only awaited)."""
        event = {"swapped_before_step": swapped_before, "snapshot_step": snap.step,
                 "digest": snap.digest, "replaced": replaced,
                 **{k: snap.meta.get(k) for k in ("seconds", "shards", "shards_reused",
                                                  "submitted_at", "started_at", "finished_at",
                                                  "retries")}}
        self.history["refreshes"].append(event)
        self.pending_state = None

    def _check(self, step: int) -> Optional[float]:
        r = self.cfg.refresh
        if not r.measures_staleness or not self.trains_docs or step % r.check_every:
            return None
        recall = self.probe.measure(lambda t: self._embed(self.q, t),
                                    lambda t: self._embed(self.d, t), self.live.snapshot)
        row = {"step": step, "recall": recall, "seconds": self.probe.last_seconds,
               "index_step": self.live.snapshot.step, "digest": self.live.digest}
        self.history["staleness"].append(row)
        self.ctx.log_metrics(step=step, staleness_recall=recall,
                             staleness_check_s=self.probe.last_seconds)
        return recall

    def _maybe_refresh(self, step: int, stale: Optional[float]) -> None:
        from retro.components.joint.refresh_config import should_refresh

        if not self.trains_docs or not should_refresh(self.cfg.refresh, step,
                                                      self.last_refresh_step, stale,
                                                      self.refresher.in_flight()):
            return
        state = {k: v.detach().clone() for k, v in self.d.model.state_dict().items()}
        digest = self.refresher.submit(state, step)
        self.pending_state = {"state": state, "step": step, "digest": digest}
        self.history["submitted"].append({"step": step, "digest": digest, "staleness": stale,
                                          "time": time.time()})
        self.last_refresh_step = step
        self.ctx.log.info("joint: after step %d submitted refresh %s (staleness %s)", step,
                          digest[:12], "n/a" if stale is None else f"{stale:.3f}")

    # -------------------------------------------------------------------------- checkpoints
    def _checkpoint(self, step: int) -> None:
        import torch

        state = {"step": step, "index_digest": self.live.digest,
                 "last_refresh_step": self.last_refresh_step, "initial": self.initial,
                 "q": self.q.model.state_dict(), "d": self.d.model.state_dict(),
                 "lm": self.lm.state_dict() if self.cfg.train_lm else None,
                 "lm_opt": self.lm_opt.state_dict() if self.lm_opt else None,
                 "ret_opt": self.ret_opt.state_dict() if self.ret_opt else None,
                 "pending": self.pending_state, "history": self.history}
        path = self.ctx.work_dir / CHECKPOINT
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def _trim_metrics(self) -> None:
        """Drop the metrics rows a killed attempt streamed after its last checkpoint (they are
        logged again), so the curves have one row per step."""
        path = self.ctx.work_dir / "metrics.jsonl"
        if path.exists():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= self.start:
                        keep.append(line)
                except ValueError:                   # a line cut by the kill
                    continue
            path.write_text("".join(x + "\n" for x in keep))

    def _resume(self, state: dict[str, Any]) -> None:
        self.start, self.index_digest = state["step"], state["index_digest"]
        self.last_refresh_step, self.initial = state["last_refresh_step"], state["initial"]
        self.q.model.load_state_dict(state["q"])
        self.d.model.load_state_dict(state["d"])
        if state["lm"] is not None:
            self.lm.load_state_dict(state["lm"])
        for opt, key in ((self.lm_opt, "lm_opt"), (self.ret_opt, "ret_opt")):
            if opt is not None and state[key] is not None:
                opt.load_state_dict(state[key])
        self.pending_state, self.history = state["pending"], state["history"]

    # -------------------------------------------------------------------------- outputs
    def _finish(self) -> dict[str, Any]:
        """The index evaluation searches: a refresh with the final document tower (waiting for
        one in flight first), or the live one when the document tower never trained."""
        in_flight = None
        if self.refresher.in_flight():
            t0 = time.time()
            self._record_refresh(self.refresher.wait(), None, self.live.digest)
            in_flight = time.time() - t0
        if not (self.trains_docs and self.cfg.final_refresh):
            return {"digest": self.live.digest, "snapshot": self.live.snapshot, "seconds": 0.0,
                    "waited_for_in_flight_s": in_flight}
        t0 = time.time()
        snap = self.refresher.build_now(self.d.model.state_dict(), self.cfg.steps)
        return {"digest": snap.digest, "snapshot": snap, "seconds": time.time() - t0,
                "waited_for_in_flight_s": in_flight}

    def _write(self, final: dict[str, Any], train_seconds: float) -> dict[str, Any]:
        ctx, cfg, out = self.ctx, self.cfg, self.ctx.out_dir
        self.lm.save_pretrained(str(out))
        self.tok.save_pretrained(str(out))
        self.q.save(out / QUERY_ENCODER)
        self.d.save(out / DOC_ENCODER)
        (out / INDEX_DIR).mkdir()
        for f in sorted(Path(final["snapshot"].path).iterdir()):
            if f.is_file():
                shutil.copy2(f, out / INDEX_DIR / f.name)
        steps, stale, refs = (self.history[k] for k in ("steps", "staleness", "refreshes"))
        for name, rows in (("steps", steps), ("staleness", stale), ("refreshes", refs),
                           ("submitted", self.history["submitted"])):
            with open(out / f"{name}.jsonl", "w") as fh:
                fh.writelines(json.dumps(r, default=float) + "\n" for r in rows)
        overlap = sum(1 for r in steps if r.get("in_flight_after"))
        ref_s = [r["seconds"] for r in refs if r.get("seconds") is not None]
        tenth = max(1, len(steps) // 4)
        summary = {
            "arm": ctx.params.arm, "policy": cfg.refresh.policy,
            "retriever_loss": cfg.retriever_loss, "reader": cfg.reader, "steps": len(steps),
            "examples": len(self.train), "k": cfg.k, "corpus_chunks": len(self.corpus),
            "excluded_eval_questions": self.blend_info["excluded"],
            "loss_first_quarter": float(np.mean([r["loss"] for r in steps[:tenth]])),
            "loss_last_quarter": float(np.mean([r["loss"] for r in steps[-tenth:]])),
            "reader_loss_first_quarter": float(np.mean([r["reader_loss"] for r in steps[:tenth]])),
            "reader_loss_last_quarter": float(np.mean([r["reader_loss"]
                                                       for r in steps[-tenth:]])),
            "refreshes": len(refs), "refreshes_submitted": len(self.history["submitted"]),
            "refreshes_swapped_in": sum(r["swapped_before_step"] is not None for r in refs),
            "refresh_seconds": float(sum(ref_s)),
            "refresh_seconds_mean": float(np.mean(ref_s)) if ref_s else 0.0,
            "steps_with_refresh_in_flight": overlap,
            "initial_index_seconds": float(self.initial["seconds"]),
            "final_refresh_seconds": float(final["seconds"]),
            "staleness_checks": len(stale),
            "staleness_check_seconds": float(sum(r["seconds"] for r in stale)),
            "staleness_min": float(min((r["recall"] for r in stale), default=1.0)),
            "staleness_last": float(stale[-1]["recall"]) if stale else 1.0,
            "train_seconds": train_seconds,
            "step_seconds_mean": float(np.mean([r["t_end"] - r["t_start"] for r in steps])),
            "initial_index_digest": self.initial["digest"], "final_index_digest": final["digest"],
            "index_digest_at_end_of_training": self.live.digest,
        }
        (out / "joint.json").write_text(json.dumps(
            {"settings": cfg.model_dump(mode="json"), "blend": self.blend_info["blend"],
             "summary": summary, "initial_index": self.initial}, indent=2, default=str))
        try:
            from retro.components.joint.plots import plot_run

            plot_run(steps, stale, refs, out / "joint.png",
                     title=f"{ctx.name}: {cfg.refresh.policy}, {cfg.retriever_loss}")
            summary["figures"] = ["joint.png"]           # `retro report` shows it
        except ImportError:                                   # matplotlib is optional
            ctx.log.warning("joint: matplotlib missing, no joint.png")
        return summary


def _pad_rows(t: Any, k: int) -> Any:
    """[k', t] -> [k, t] with zero rows for missing chunks."""
    import torch

    return t if t.shape[0] == k else torch.cat([t, t.new_zeros((k - t.shape[0], t.shape[1]))])
