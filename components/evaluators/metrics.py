"""QA metrics, pure Python: SQuAD answer normalisation, exact match, token F1, answer recall.

Follows the SQuAD v1.1 / v2.0 official script and InstructRetro's `evaluate.py`
(REFERENCE §5.1): lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace;
EM and F1 take the max over the gold answers.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall after normalisation.

    Two empty answers score 1.0; an empty answer against a non-empty one scores 0.0 (as the
    official SQuAD v2 script does).
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def max_over_golds(metric, prediction: str, golds: Iterable[str]) -> float:
    """Best score of `prediction` against any gold answer (0.0 when there are none)."""
    return max((metric(prediction, g) for g in golds), default=0.0)


def answer_in_text(text: str, golds: Iterable[str]) -> bool:
    """True if some normalised gold answer occurs as a whole-token span of normalised `text`.

    The retriever-only signal of DPR's "top-k accuracy": does a passage contain an answer.
    """
    hay = f" {normalize_answer(text)} "
    return any(g and f" {g} " in hay for g in (normalize_answer(a) for a in golds))


def qa_scores(prediction: str, golds: list[str]) -> dict[str, float]:
    """{"em", "f1"} of one prediction against its gold answers."""
    return {"em": max_over_golds(exact_match, prediction, golds),
            "f1": max_over_golds(token_f1, prediction, golds)}


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
