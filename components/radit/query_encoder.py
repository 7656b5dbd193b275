"""The query side of the dual encoder, trainable: the spec's `hf-mean-pool` embedder with grads.

Initialised from the encoder the DB was embedded with, it pools exactly as the embedder does
(mean over non-special tokens, optional L2 norm), so before training it returns the embedder's
vectors. Only this copy trains; the chunk embeddings and the index are read, never rewritten.
Saved as a plain Hugging Face encoder folder, which is an `hf-mean-pool` `model` like any other:
`qa-retrieve` and `ra-it` take it as their `query_encoder` input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from retro.platform.errors import UserError
from retro.components.retrieval.common import build_component


class QueryEncoder:
    """A trainable copy of an embedder's model.

    Args:
        embedder_node: the spec's `retriever.embedder` node (JSON), an `hf-mean-pool`.
        device: torch device (default CPU).
    """

    def __init__(self, embedder_node: dict[str, Any], device: str = "cpu"):
        if embedder_node.get("type", "hf-mean-pool") != "hf-mean-pool":
            raise UserError(f"RA-DIT fine-tunes an hf-mean-pool query encoder, not "
                            f"{embedder_node.get('type')!r} (retriever.embedder.type)")
        self.embedder = build_component("embedder", embedder_node)
        self.embedder.load()
        self.config = self.embedder.config
        self.model = self.embedder._model.to(device)
        self.tokenizer = self.embedder._tokenizer
        self.device = self.embedder.device = device     # where `pool` sends its inputs

    def parameters(self) -> Any:
        return self.model.parameters()

    def train(self, mode: bool = True) -> "QueryEncoder":
        self.model.train(mode)
        return self

    def __call__(self, texts: list[str]) -> Any:
        """Embeddings [n, d] (torch, with gradient when the model trains)."""
        enc = self.embedder.tokenize(list(texts))
        return self.embedder.pool(*self.embedder.pad(enc["input_ids"],
                                                     enc["special_tokens_mask"]))

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Embeddings [n, d] float32 without gradient (eval mode is left as set)."""
        import torch

        out = []
        with torch.no_grad():
            for a in range(0, len(texts), batch_size):
                out.append(self(texts[a:a + batch_size]).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def save(self, path: Path) -> Path:
        """Write the encoder + tokenizer (`save_pretrained`); returns the folder."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))
        return path
