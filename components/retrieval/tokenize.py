"""The `tokenize` stage: corpus -> one token memmap + document offsets + document ids.

Shards are contiguous document ranges (from the corpus scan); each shard streams its documents
through the tokenizer into its own raw file, then the driver concatenates the files block by
block. Memory stays flat in corpus size; the output does not depend on the number of shards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from retro.components.corpora.base import ReadStats
from retro.components.retrieval.common import (build_component, done_marker, read_meta, run_shards,
                                              shard_count, write_meta)
from retro.platform.spec.node import Node
from retro.platform.stage import StageContext, StageParams, stage
from retro.platform.store import open_memmap

_DOCS_PER_SHARD = 20_000
_BATCH = 256
_COPY_BLOCK = 1 << 24


def token_dtype(vocab_size: int) -> str:
    """Smallest unsigned dtype holding every id."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class TokenizeParams(StageParams):
    corpus: Node("corpus")
    """The corpus node."""


@stage("tokenize", version="2", params=TokenizeParams,
       inputs={"tokenizer": "the decoder tokenizer (tokenizer)"},
       estimate=lambda p: {"corpus": p.corpus.type,
                           "max_documents": getattr(p.corpus, "max_documents", None)})
def tokenize(ctx: StageContext[TokenizeParams]) -> dict:
    """Tokenize every document of the corpus (no EOD: sequences and chunks add what they need).

    Params: `corpus` (the corpus node). Inputs: `tokenizer`.
    Files: `tokens.npy` uint16/uint32 [n_tokens]; `doc_offsets.npy` int64 [n_docs + 1];
    `docs.jsonl` one `{"id", "title"}` per document; `meta.json`.
    """
    corpus = build_component("corpus", ctx.params.corpus)
    scan = corpus.scan(ctx.parallel_map)  # every input error surfaces here, before tokenizing
    ctx.log.info("corpus: %d documents in %d sources", scan.n_docs, len(scan.sources))
    tok_meta = read_meta(ctx.inputs["tokenizer"].path)
    dtype = token_dtype(tok_meta["vocab_size"])
    n_shards = shard_count(ctx, scan.n_docs, _DOCS_PER_SHARD)
    shards = scan.shards(n_shards)
    jobs = [{"corpus": ctx.params.corpus.model_dump(mode="json"), "tokenizer": str(ctx.inputs["tokenizer"].path),
             "pieces": pieces, "dtype": dtype, "dir": str(ctx.work_dir / f"shard-{i:05d}")}
            for i, pieces in enumerate(shards)]
    sizes = [sum(b - a for _, a, b in pieces) for pieces in shards]
    results = run_shards(ctx, _tokenize_shard, jobs, sizes, "tokenize docs")
    n_tokens = _merge(ctx.out_dir, [Path(j["dir"]) for j in jobs], results, dtype)
    n_docs = sum(r["n_docs"] for r in results)
    write_meta(ctx.out_dir, n_docs=n_docs, n_tokens=n_tokens, dtype=dtype,
               eod_id=tok_meta["eod_id"], vocab_size=tok_meta["vocab_size"])
    return {"n_docs": n_docs, "n_tokens": n_tokens, "tokens_per_doc": n_tokens / max(n_docs, 1),
            "skipped_bad_records": scan.stats.bad_records,
            "skipped_empty_records": scan.stats.empty_records}


def _tokenize_shard(job: dict) -> dict:
    """Tokenize one shard's documents into `<dir>/tokens.bin`, `lens.npy`, `docs.jsonl`."""
    from tokenizers import Tokenizer

    out = Path(job["dir"])
    marker = done_marker(out.parent, out.name)
    if marker.exists():  # finished before an interruption
        return json.loads(marker.read_text())
    out.mkdir(parents=True, exist_ok=True)
    corpus = build_component("corpus", job["corpus"])
    tok = Tokenizer.from_file(str(Path(job["tokenizer"]) / "tokenizer.json"))
    lens: list[int] = []
    stats = ReadStats()
    with open(out / "tokens.bin", "wb") as fh, open(out / "docs.jsonl", "w") as dj:
        batch = []

        def flush() -> None:
            for doc, enc in zip(batch, tok.encode_batch([d.text for d in batch],
                                                        add_special_tokens=False)):
                np.asarray(enc.ids, dtype=job["dtype"]).tofile(fh)
                lens.append(len(enc.ids))
                dj.write(json.dumps({"id": doc.doc_id, "title": doc.title}) + "\n")
            batch.clear()

        for source, a, b in job["pieces"]:
            for doc in corpus.documents(source, a, b, stats):
                batch.append(doc)
                if len(batch) >= _BATCH:
                    flush()
        flush()
    np.save(out / "lens.npy", np.asarray(lens, dtype=np.int64))
    result = {"n_docs": len(lens), "n_tokens": int(sum(lens))}
    marker.write_text(json.dumps(result))
    return result


def _merge(out_dir: Path, dirs: list[Path], results: list[dict], dtype: str) -> int:
    n_tokens = sum(r["n_tokens"] for r in results)
    tokens = open_memmap(out_dir / "tokens.npy", dtype, (n_tokens,), mode="w+")
    pos = 0
    lens = []
    with open(out_dir / "docs.jsonl", "wb") as docs:
        for d, r in zip(dirs, results):
            if r["n_tokens"]:
                part = np.memmap(d / "tokens.bin", dtype=dtype, mode="r")
                for a in range(0, len(part), _COPY_BLOCK):
                    block = part[a:a + _COPY_BLOCK]
                    tokens[pos:pos + len(block)] = block
                    pos += len(block)
                del part
            lens.append(np.load(d / "lens.npy"))
            with open(d / "docs.jsonl", "rb") as src:
                shutil.copyfileobj(src, docs)
    tokens.flush()
    del tokens
    lens_all = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    offsets = np.zeros(len(lens_all) + 1, dtype=np.int64)
    np.cumsum(lens_all, out=offsets[1:])
    np.save(out_dir / "doc_offsets.npy", offsets)
    return n_tokens

