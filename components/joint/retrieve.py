"""`joint-retrieve`: the qa evaluator's questions against a joint run's own retriever.

`qa-retrieve` searches the DB's index; after joint training the document side has moved too, so
the questions are embedded with the run's final query tower and searched in the run's final index
(`index/` of the joint-train artifact, built with its final document tower). The output has
qa-retrieve's layout (contexts/<dataset>.jsonl, answer recall@{1, 5, k}), so `eval-qa` reads it
unchanged.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from retro.components.evaluators.qa import RETRIEVE_FIELDS, write_contexts
from retro.components.evaluators.qa_data import load_questions
from retro.platform.spec.node import NodeFields
from retro.platform.stage import StageCall, StageContext, StageParams, stage


class JointRetrieveParams(StageParams):
    evaluator: NodeFields("evaluator", *RETRIEVE_FIELDS)
    """The qa node's question set and `retrieve_k`."""
    retriever: NodeFields("retriever", "embedder", "index")
    """The embedder's pooling settings (its weights come from the joint run)."""


@stage("joint-retrieve", version="1", params=JointRetrieveParams,
       inputs={"joint": "a joint-train artifact (query_encoder/, index/)",
               "tokenizer": "the DB tokenizer (tokenizer)", "tokens": "document tokens (tokenize)",
               "chunk_db": "the chunk table (chunk-db)"})
def joint_retrieve(ctx: StageContext[JointRetrieveParams]) -> dict[str, Any]:
    """Top-`retrieve_k` passages per question from the joint run's retriever, answer recall.

    Params: the qa node's datasets, data_dir, limit, answer_in_corpus, retrieve_k; the spec's
    retriever (embedder pooling, index metric). Inputs: `joint`, `tokenizer`, `tokens`,
    `chunk_db`. Writes: contexts/<dataset>.jsonl as qa-retrieve does.
    """
    import faiss

    from retro.components.joint.train import INDEX_DIR, QUERY_ENCODER
    from retro.components.retrieval.chunking import ChunkDB
    from retro.components.retrieval.common import build_component
    from retro.components.retrieval.retriever import Passage
    from retro.components.tokenizers.stage import load_tokenizer

    p = ctx.params.evaluator.model_dump(mode="json")
    node = ctx.params.retriever.model_dump(mode="json")
    joint = Path(ctx.inputs["joint"].path)
    embed = build_component("embedder", {**node["embedder"],
                                         "model": str(joint / QUERY_ENCODER)}).embed
    index = faiss.read_index(str(joint / INDEX_DIR / "index.faiss"))
    db = ChunkDB(ctx.inputs["chunk_db"].path, ctx.inputs["tokens"].path)
    tok = load_tokenizer(ctx.inputs["tokenizer"])
    docs = db.doc_table()
    out = ctx.out_dir / "contexts"
    out.mkdir()
    summary: dict[str, Any] = {}
    ks = sorted({1, min(5, p["retrieve_k"]), p["retrieve_k"]})
    for name in p["datasets"]:
        examples = load_questions(p["data_dir"], name, p["limit"], p["answer_in_corpus"])
        with ctx.timer("search"):
            q = np.ascontiguousarray(embed([e.question for e in examples]), dtype=np.float32)
            scores, ids = index.search(q, p["retrieve_k"])
        hits = [[asdict(Passage(int(i), docs[d]["id"], db.chunk_text(i, tok), float(s),
                                docs[d].get("title", "")))
                 for i, s, d in zip(row_ids, row_scores, db.doc_of(row_ids)) if i >= 0]
                for row_ids, row_scores in zip(ids, scores)]
        summary.update(write_contexts(out / f"{name}.jsonl", name, examples, hits, ks))
    return summary


def joint_retrieve_call(name: str, eval_path: str, joint: StageCall,
                        db: dict[str, StageCall]) -> StageCall:
    """The `joint-retrieve` call of one joint arm for the qa evaluator at `eval_path`."""
    from retro.platform.stage import Pick

    return StageCall(name, "joint-retrieve",
                     reads={"evaluator": Pick(eval_path, RETRIEVE_FIELDS),
                            "retriever": "retriever"},
                     inputs={"joint": joint, **{s: db[s] for s in ("tokenizer", "tokens",
                                                                   "chunk_db")}})
