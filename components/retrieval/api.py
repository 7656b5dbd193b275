"""The retrieval DB's public Python API, for other components (training, QA eval, RA-DIT).

    from retro.components.retrieval.api import ChunkDB, Neighbours, Retriever, Sequences, \
        load_tokenizer

Artifact readers take an `Artifact` (what `ctx.inputs[slot]` holds) or its folder.
"""

from retro.components.retrieval.chunking import ChunkDB, SplitConfig
from retro.components.retrieval.neighbours import Neighbours
from retro.components.retrieval.recipe import call, db_stage_calls, retriever_inputs
from retro.components.retrieval.retriever import Passage, Retriever
from retro.components.retrieval.sequences import Sequences
from retro.components.tokenizers.stage import load_tokenizer

__all__ = ["ChunkDB", "Neighbours", "Passage", "Retriever", "Sequences", "SplitConfig",
           "call", "db_stage_calls", "load_tokenizer", "retriever_inputs"]
