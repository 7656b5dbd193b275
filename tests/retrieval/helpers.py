"""Shared helpers for the retrieval tests: build components and stage contexts without Ray."""

from __future__ import annotations

import gzip
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from retro.components.retrieval.common import build_component
from retro.platform.spec.model import ResourceRequest
from retro.platform.stage import StageContext
from retro.platform.store import Artifact

WIKI = "wiki_featured_passages/passages.part-00.jsonl.gz"


class _NullTracker:
    def log_config(self, config): ...
    def log_metrics(self, metrics, step=None): ...
    def log_artifact(self, artifact, lineage): ...
    def finish(self, status="success"): ...


def corpus(**node: Any):
    """A corpus component from its spec fields."""
    return build_component("corpus", {"type": "jsonl", **node})


def write_jsonl(path: Path, records: list[Any], gz: bool = False) -> Path:
    """Write records (dicts, or raw bytes lines) as JSON Lines."""
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]
    data = b"\n".join(lines) + b"\n"
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


def wiki_records(shared: Path, n_docs: int) -> list[dict]:
    """The first records of the first `n_docs` articles of part-00."""
    out = []
    with gzip.open(shared / WIKI, "rt") as fh:
        records = (json.loads(line) for line in fh)
        for _, group in itertools.islice(itertools.groupby(records, lambda r: r["doc_id"]),
                                         n_docs):
            out += list(group)
    return out


def stage_ctx(tmp: Path, name: str, params: dict, inputs: dict[str, Path],
              num_workers: int = 1) -> StageContext:
    """A StageContext that runs shards inline (the function under test is the real stage)."""
    out, work = tmp / name / "out", tmp / name / "work"
    out.mkdir(parents=True)
    work.mkdir(parents=True)
    log = logging.getLogger(f"test.{name}")
    return StageContext(
        name=name, stage=name, key="0" * 32, params=params,
        inputs={slot: Artifact(slot, "0" * 32, Path(p)) for slot, p in inputs.items()},
        out_dir=out, work_dir=work, seed=0, resources=ResourceRequest(num_workers=num_workers),
        log=log, tracker=_NullTracker())


def write_spec(path: Path, store: Path, **sections: Any) -> Path:
    """A spec YAML with its own store and run folders."""
    spec = {"name": "retrieval-test", "tracking": [{"type": "none"}],
            "store": {"path": str(store / "store"), "runs": str(store / "runs")}, **sections}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
