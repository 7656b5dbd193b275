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


class QueryEncoder:
    """A trainable copy of an embedder's model.

    Args:
        embedder_node: the spec's `retriever.embedder` node (JSON), an `hf-mean-pool`.
        device: torch device (default CPU).
    """

    def __init__(self, embedder_node: dict[str, Any], device: str = "cpu"):
        from retro.components.retrieval.common import build_component

        if embedder_node.get("type", "hf-mean-pool") != "hf-mean-pool":
            raise UserError(f"RA-DIT fine-tunes an hf-mean-pool query encoder, not "
                            f"{embedder_node.get('type')!r} (retriever.embedder.type)")
        self.embedder = build_component("embedder", embedder_node)
        self.embedder.load()
        self.config = self.embedder.config
        self.model = self.embedder._model.to(device)
        self.tokenizer = self.embedder._tokenizer
        self.device = device

    def parameters(self) -> Any:
        return self.model.parameters()

    def train(self, mode: bool = True) -> "QueryEncoder":
        self.model.train(mode)
        return self

    def __call__(self, texts: list[str]) -> Any:
        """Embeddings [n, d] (torch, with gradient when the model trains)."""
        import torch

        enc = self.embedder.tokenize(list(texts))
        ids, special = enc["input_ids"], enc["special_tokens_mask"]
        width = max(len(x) for x in ids)
        x = torch.zeros((len(ids), width), dtype=torch.long)
        attn = torch.zeros_like(x)
        keep = torch.zeros((len(ids), width), dtype=torch.bool)
        for j, (row, sp) in enumerate(zip(ids, special)):
            x[j, :len(row)] = torch.tensor(row)
            attn[j, :len(row)] = 1
            keep[j, :len(row)] = (torch.tensor(sp) == 0) if self.config.exclude_special_tokens \
                else True
        hidden = self.model(input_ids=x.to(self.device),
                            attention_mask=attn.to(self.device)).last_hidden_state
        w = keep.to(hidden.device, hidden.dtype).unsqueeze(-1)          # [n, t, 1]
        pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1)            # [n, d]
        if self.config.normalize:
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
        return pooled

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
