"""Registers retro's built-in components (entry point `retro.components:builtin`).

Component modules keep torch, faiss, transformers and ray imports inside functions, so loading
them all costs milliseconds and `retro validate` stays fast.
"""

import importlib

MODULES = [
    "retro.components.trackers.basic",
    "retro.components.corpora.jsonl",
    "retro.components.corpora.text_dir",
    "retro.components.corpora.hf_disk",
    "retro.components.tokenizers.sources",
    "retro.components.tokenizers.stage",
    "retro.components.retrieval.tokenize",
    "retro.components.retrieval.chunking",
    "retro.components.retrieval.sequences",
    "retro.components.retrieval.embedders",
    "retro.components.retrieval.embed",
    "retro.components.retrieval.faiss_index",
    "retro.components.retrieval.retrievers",
    "retro.components.retrieval.neighbours",
    "retro.components.retrieval.quality",
    "retro.components.retrieval.bm25",
    "retro.components.retrieval.recipe",
    "retro.components.training.config",
    "retro.components.training.stages",
    "retro.components.instruct.config",
    "retro.components.instruct.sources",
    "retro.components.instruct.stage",
    "retro.components.trackers.wandb_tracker",
    "retro.components.evaluators.qa",
    "retro.components.evaluators.ppl",
    "retro.components.evaluators.recipe",
    "retro.components.models.retro.component",
    "retro.components.models.retro.checkpoints",
    "retro.components.recipes.instructretro",
    "retro.components.radit.config",
    "retro.components.radit.data",
    "retro.components.radit.stages",
    "retro.components.radit.recipe",
    "retro.components.joint.train",
    "retro.components.joint.retrieve",
    "retro.components.joint.recipe",
    "retro.components.knnlm.config",
    "retro.components.knnlm.datastore",
    "retro.components.knnlm.eval_knn",
    "retro.components.knnlm.ralm",
    "retro.components.knnlm.recipe",
]


def register_all() -> None:
    """Import the modules whose decorators register built-in components."""
    for name in MODULES:
        importlib.import_module(name)
