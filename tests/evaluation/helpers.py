"""Helpers for the evaluator tests: a small real retrieval DB and stage contexts without Ray."""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from retro.platform.spec.model import ResourceRequest
from retro.platform.stage import StageContext
from retro.platform.store import Artifact, ArtifactStore

WIKI = "wiki_featured_passages/passages.part-00.jsonl.gz"
CHUNK = 16


class NullTracker:
    def log_config(self, config): ...
    def log_metrics(self, metrics, step=None): ...
    def log_artifact(self, artifact, lineage): ...
    def finish(self, status="success"): ...


def wiki_corpus(shared: Path, out: Path, n_docs: int) -> Path:
    """The records of the first `n_docs` articles of wiki part-00, as a .jsonl file."""
    with gzip.open(shared / WIKI, "rt") as fh:
        records = (json.loads(line) for line in fh)
        groups = itertools.islice(itertools.groupby(records, lambda r: r["doc_id"]), n_docs)
        rows = [r for _, group in groups for r in itertools.islice(group, 4)]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def db_spec(tmp: Path, shared: Path, retriever: str = "dense") -> Path:
    """A `retro-db` spec over a 20-article corpus (4 passages each), GPT-2 BPE, 16-token chunks."""
    corpus = wiki_corpus(shared, tmp / "wiki.jsonl", 20)
    node: dict[str, Any] = {"type": retriever, "chunk_length": CHUNK,
                            "split": {"valid": 0.15, "heldout": 0.0},
                            "neighbours": {"k": 2}}
    if retriever == "dense":
        node["index"] = {"type": "faiss", "factory": "Flat"}
    spec = {"name": f"evaldb-{retriever}", "recipe": {"type": "retro-db", "seq_length": 64},
            "corpus": {"type": "jsonl", "paths": [str(corpus)]},
            "tokenizer": {"type": "gpt2-files", "path": str(shared / "tokenizer_gpt2")},
            "retriever": node, "tracking": "none",
            "store": {"path": str(tmp / "store"), "runs": str(tmp / "runs")}}
    path = tmp / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def artifacts_by_name(store: Path, plan: Any) -> dict[str, Artifact]:
    """Call name -> committed artifact, for a single-variant plan."""
    st = ArtifactStore(store)
    return {s.name: st.get(s.stage, s.key) for s in plan.stages}


def stage_ctx(tmp: Path, name: str, params: dict, inputs: dict[str, Artifact]) -> StageContext:
    """A StageContext whose out/work dirs live under `tmp/name` (the stage runs inline)."""
    out, work = tmp / name / "out", tmp / name / "work"
    shutil.rmtree(tmp / name, ignore_errors=True)
    out.mkdir(parents=True)
    work.mkdir(parents=True)
    return StageContext(name=name, stage=name, key="0" * 32, params=params,
                        inputs=inputs,
                        out_dir=out, work_dir=work, seed=0,
                        resources=ResourceRequest(cpus_per_worker=2),
                        log=logging.getLogger(f"test.{name}"), tracker=NullTracker())


def as_artifact(path: Path, stage: str = "model") -> Artifact:
    return Artifact(stage, "0" * 32, Path(path))


def metrics_rows(ctx: StageContext) -> list[dict]:
    f = ctx.work_dir / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []
