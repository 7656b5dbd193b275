"""Evaluation questions kept out of instruction tuning (RA-DIT's recipe, REFERENCE §6).

A blend record is dropped when its question (a QA record's own question, else its last user
message) is, after SQuAD normalisation, a question one of the spec's `qa` evaluators asks. The
`instruct` stage counts the dropped records in its manifest (`excluded_eval_questions`).
"""

from __future__ import annotations

from typing import Any, Sequence

from retro.platform.errors import InputDataError
from retro.components.evaluators.metrics import normalize_answer
from retro.components.evaluators.qa_data import load_questions
from retro.components.instruct.sources import Loaded


def qa_eval_sets(spec: Any) -> list[dict[str, Any]]:
    """The question sets of the spec's `qa` evaluators (a recipe passes them as a const)."""
    return [{"data_dir": str(e.data_dir), "datasets": list(e.datasets), "limit": e.limit,
             "answer_in_corpus": e.answer_in_corpus} for e in spec.eval if e.type == "qa"]


def eval_questions(sets: Sequence[dict[str, Any]]) -> set[str]:
    """Normalised question texts of the given QA evaluation sets."""

    out: set[str] = set()
    for s in sets:
        for name in s["datasets"]:
            out |= {normalise(e.question) for e in load_questions(
                s["data_dir"], name, s.get("limit"), s.get("answer_in_corpus", False))}
    return out


def question_of(conv: Any) -> str:
    """The question a blend record asks: a QA pair's own question, else its last user turn."""
    return getattr(conv, "query", "") or conv.turns[-1][0]


def drop_eval_questions(nodes: Sequence[Any], loaded: Sequence[Any], banned: set[str]
                        ) -> tuple[list[Any], int]:
    """Each source's records minus those asking a banned question; the count dropped.

    Raises:
        InputDataError: a source has nothing left.
    """

    if not banned:
        return list(loaded), 0
    out, dropped = [], 0
    for node, src in zip(nodes, loaded):
        keep = [c for c in src.conversations if normalise(question_of(c)) not in banned]
        dropped += len(src.conversations) - len(keep)
        if not keep:
            raise InputDataError(f"instruct.blend: every record of {node.type} at {node.path!r} "
                                 "is a question of the QA evaluation; train on other data")
        out.append(Loaded(keep, src.skipped, src.files, src.sha256))
    return out, dropped


def normalise(text: str) -> str:
    return normalize_answer(text)
