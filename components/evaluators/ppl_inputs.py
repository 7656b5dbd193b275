"""What eval-ppl feeds the model and what it counts: the neighbours a Retro model trained with,
the in-context RAG prompt, and the document bytes behind bits per byte (issue 13).

- Neighbours: a Retro model is scored with the k it trained with (`num_neighbours` in its
  `training.json`, written by retro-fit), unless the ppl node's `neighbours` says otherwise.
- In-context prompt for chunk j: the retrieved text of chunk j-1 (neighbour + continuation,
  padding dropped) then the preceding sequence tokens, cut from the left only so that prompt +
  chunk fit the same window as the no-RAG baseline (the sequence length).
- Bytes: each token's UTF-8 byte count from the tokenizer's vocabulary (byte-level BPE: the
  bytes it stands for; SentencePiece: "▁" = a space, "<0xNN>" = one byte); special tokens (EOD)
  spell no document text and count 0 bytes. bpb = NLL of the targets that spell document text /
  ln 2 / their bytes (RETRO's bits per byte over the documents' own bytes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from retro.components.training.models import TRAINING_META

def trained_neighbours(model_dir: Path) -> Optional[int]:
    """Neighbours per chunk the model was trained with (its `training.json`), or None."""

    f = Path(model_dir) / TRAINING_META
    if not f.is_file():
        return None
    k = json.loads(f.read_text()).get("num_neighbours")
    return int(k) if k else None


def in_context_prompt(seq: Sequence[int], lo: int, hi: int, retrieved: np.ndarray,
                      pad_id: int, window: int) -> list[int]:
    """Prompt tokens that precede chunk seq[lo:hi] with retrieval in the context.

    Args:
        seq: the sequence's tokens.
        lo, hi: the scored chunk's bounds.
        retrieved: [k, 2m] neighbour + continuation tokens of chunk j-1 (-1 = no neighbour,
            `pad_id` = EOD padding of a short chunk or a missing continuation).
        pad_id: the DB's padding id; never part of a DB chunk's text.
        window: tokens of prompt + chunk at most (the baseline's window).
    """
    text = [int(t) for t in np.asarray(retrieved).reshape(-1) if t >= 0 and t != pad_id]
    room = max(0, window - len(text) - (hi - lo))
    prefix = text + [int(t) for t in seq[max(0, lo - room):lo]]
    return prefix or [int(seq[lo - 1])]


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
    """UTF-8 bytes each token id stands for [vocab] (0 for special tokens)."""
    vocab = tokenizer.get_vocab()
    out = np.zeros(max(len(tokenizer), max(vocab.values()) + 1), dtype=np.int64)
    byte_level = _is_byte_level(tokenizer)
    inverse = {c: b for b, c in _bytes_to_unicode().items()} if byte_level else {}
    special = set(tokenizer.all_special_ids)
    for piece, i in vocab.items():
        if i in special:
            continue
        if byte_level:
            out[i] = sum(1 if c in inverse else len(c.encode("utf-8")) for c in piece)
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            out[i] = 1                                  # SentencePiece byte fallback
        else:
            out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return out


def text_targets(targets: Any, byte_lengths: np.ndarray) -> np.ndarray:
    """Mask of the target tokens that spell document text (bytes > 0) [b, n] bool."""
    return byte_lengths[np.asarray(targets)] > 0


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(d.get("type") == "ByteLevel" for d in parts)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE vocabularies use it)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
