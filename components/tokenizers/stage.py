"""The `tokenizer` stage (train or copy the decoder tokenizer) and `load_tokenizer`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from retro.components.corpora.splits import SPLITS, SplitConfig, assign_splits
from retro.platform.registry import registry
from retro.platform.spec.node import Node
from retro.platform.store import write_json_atomic
from retro.platform.stage import StageContext, StageParams, stage


class TokenizerParams(StageParams):
    tokenizer: Node("tokenizer")
    """The spec's tokenizer node."""
    corpus: Optional[Node("corpus")] = None
    """The corpus, only for tokenizers that train on it."""
    split: Optional[dict[str, Any]] = None
    """`retriever.split`, with `corpus`: a trained tokenizer sees train-split documents only
    (never validation or held-out text, which it would otherwise be scored on)."""


@stage("tokenizer", version="2", params=TokenizerParams,
       estimate=lambda p: {"tokenizer": p.tokenizer.type})
def tokenizer_stage(ctx: StageContext[TokenizerParams]) -> dict:
    """Save the decoder tokenizer into the artifact as an HF fast-tokenizer folder.

    Params: `tokenizer` (the spec's tokenizer node), `corpus` (only for tokenizers that train).
    Files: `tokenizer.json`, `tokenizer_config.json`, `meta.json` {eod_id, vocab_size}.
    """
    source = registry.build("tokenizer", ctx.params.tokenizer)
    corpus = registry.build("corpus", ctx.params.corpus) if source.needs_corpus else None
    if corpus is not None:
        corpus.sources()  # a missing corpus fails here, before training
        if ctx.params.split is not None:
            corpus = TrainSplit(corpus, ctx.params.split, ctx.parallel_map)
            ctx.log.info("tokenizer: training on the %d train-split documents of %d",
                         corpus.n_train, corpus.n_docs)
    tok = source.build(corpus, ctx.log)
    tok.save_pretrained(str(ctx.out_dir))
    vocab_size = len(tok)
    # The same meta.json every retrieval artifact writes (retrieval.common.write_meta).
    write_json_atomic(ctx.out_dir / "meta.json", {"eod_id": int(tok.eos_token_id),
                                                  "eod_token": tok.eos_token,
                                                  "vocab_size": vocab_size})
    return {"vocab_size": vocab_size, "eod_id": int(tok.eos_token_id)}


class TrainSplit:
    """A corpus seen through `retriever.split`: `iter_all` yields its train documents only,
    numbered as `tokenize` and `chunk-db` number them (the corpus scan's order)."""

    def __init__(self, corpus: Any, split: dict[str, Any], parallel_map: Any = None):
        self.corpus = corpus
        self.scan = corpus.scan(parallel_map)
        self.n_docs = self.scan.n_docs
        self.is_train = assign_splits(self.n_docs, SplitConfig.model_validate(split)) == \
            SPLITS["train"]
        self.n_train = int(self.is_train.sum())

    def iter_all(self, limit: Optional[int] = None):
        """Train documents in corpus order, at most `limit`."""
        n, i = 0, 0
        for source, first, stop in self.scan.shards(1)[0]:
            for doc in self.corpus.documents(source, first, stop):
                if limit is not None and n >= limit:
                    return
                if self.is_train[i]:
                    n += 1
                    yield doc
                i += 1


def load_tokenizer(artifact_path: Any):
    """The decoder tokenizer saved by the `tokenizer` stage.

    Args:
        artifact_path: the tokenizer artifact (an `Artifact` or its folder).

    Returns:
        A `PreTrainedTokenizerFast` with `eos_token_id` = the EOD id and pad = eos.
    """
    from transformers import PreTrainedTokenizerFast

    path = Path(getattr(artifact_path, "path", artifact_path))
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok

