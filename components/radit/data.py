"""RA-DIT's training examples: (x, y) pairs from blend sources, minus the evaluation questions.

Both fine-tuning sets are lists of `blend-source` nodes (the formats of `instruct.blend`, plus
`qa-pairs` registered here for open-domain QA files). An example keeps its conversation (the last
assistant message is y) and its retrieval query: the question for `qa-pairs`, the last user
message otherwise (RA-DIT retrieves with the instruction x).

Questions that a `qa` evaluator of the spec will ask are removed from training (SQuAD-normalised
text match), so a QA file that overlaps the test set can be used for training safely.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Optional, Sequence

from pydantic import Field

from retro.components.evaluators.prompts import ANSWER_PREFIX, SHORT_SPAN
from retro.components.instruct.sources import (Conversation, Loaded, SourceConfig,
                                               json_array_records, jsonl_records, require)
from retro.platform.errors import InputDataError
from retro.platform.registry import register, registry
import gzip
from retro.components.instruct.blend import realize
from retro.components.instruct.holdout import eval_questions, normalise
from retro.components.instruct.sources import load_source


@dataclass
class QAConversation(Conversation):
    """A conversation that also knows its bare question (the retrieval query)."""

    query: str = ""
    answers: list[str] = field(default_factory=list)


registry.add_kind("blend-source", "A loader for one instruction-data format.")


@register("blend-source", "qa-pairs")
class QAPairs:
    """Open-domain QA pairs: {question, answers: [...]} or {question, answer}, JSONL or JSON.

    E.g. the QA evaluator's files or nq_open_oracle/questions. The first answer is the target;
    the default template matches the QA evaluator's prompt (short-span instruction, "The answer
    is ...")."""

    class Config(SourceConfig):
        FIELDS: ClassVar[tuple[str, ...]] = ("question", "answer")
        DEFAULT: ClassVar[tuple[str, str]] = (SHORT_SPAN + "{question}",
                                              ANSWER_PREFIX + " {answer}")
        max_records: Optional[int] = Field(None, ge=1)
        """Read only the first N records of the files (None: all), e.g. the questions whose
        gold passage is in a small corpus."""

    @staticmethod
    def load(cfg: Config, files: list[Path]) -> Loaded:
        out = Loaded([])
        records = _records(files)
        if cfg.max_records is not None:
            records = itertools.islice(records, cfg.max_records)
        for where, rec in records:
            require(rec, where, "qa-pairs", "question")
            answers = rec.get("answers")
            if answers is None:
                answers = [rec.get("answer")]
            if not isinstance(answers, list):
                raise InputDataError(f"{where}: qa-pairs `answers` must be a list of strings")
            answers = [str(a).strip() for a in answers if isinstance(a, str) and a.strip()]
            question = str(rec["question"]).strip()
            if not question or not answers:
                out.skipped += 1
                continue
            turns = [cfg.render_fields({"question": question, "answer": answers[0]})]
            out.conversations.append(QAConversation(turns, where, question, answers))
        return out


def _records(files: list[Path]) -> Iterator[tuple[str, Any]]:
    """Records of JSON-array or JSONL files (decided by the first character)."""

    for f in files:
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt", encoding="utf-8") as fh:
            head = fh.read(1024).lstrip()
        yield from (json_array_records([f]) if head.startswith("[") else jsonl_records([f]))


@dataclass(frozen=True)
class Example:
    """One (x, y) training pair."""

    query: str
    """Retrieval query: the question, or the last user message."""
    turns: tuple[tuple[str, str], ...]
    """The conversation; `turns[-1][1]` is y."""
    where: str
    """file:line of the record."""
    target: str = ""
    """y without the answer template (qa-pairs: the gold answer after "The answer is"); empty:
    y is the whole last assistant message. LSR scores these tokens only."""


def target_of(conv: Conversation) -> str:
    """y proper of a conversation: a QA pair's gold answer when the rendered answer ends with
    it (the template before it, e.g. "The answer is", is not y); else empty (the whole
    answer)."""
    answers = getattr(conv, "answers", None)
    if answers and conv.turns[-1][1].rstrip().endswith(answers[0]):
        return answers[0]
    return ""


def query_of(conv: Conversation) -> str:
    """The text RA-DIT retrieves with for this conversation."""
    return getattr(conv, "query", "") or conv.turns[-1][0]


def load_examples(nodes: Sequence[Any], total: int, eval_samples: int, seed: int,
                  exclude: Sequence[dict[str, Any]] = ()) -> tuple[list[Example], list[Example],
                                                                   dict[str, Any]]:
    """Training and held-out examples drawn from blend sources, as `instruct` draws its blend.

    Args:
        nodes: validated blend-source nodes.
        total: training examples to draw (weights / samples / epochs as in `instruct.blend`).
        eval_samples: examples held out (proportionally per source).
        seed: the experiment seed.
        exclude: QA evaluation sets whose questions must not be trained on: dicts with
            `data_dir`, `datasets`, `limit`, `answer_in_corpus` (the `qa` evaluator's fields).

    Returns:
        (train, held_out, info) with info = {"blend": [...], "excluded": n}.

    Raises:
        InputDataError: a source is unreadable or has nothing left after the exclusion.
    """

    banned = eval_questions(exclude)
    loaded, excluded = [], 0
    for node in nodes:
        src = load_source(node)
        keep = [c for c in src.conversations if normalise(query_of(c)) not in banned]
        excluded += len(src.conversations) - len(keep)
        if not keep:
            raise InputDataError(f"blend source {node.type} at {node.path!r}: every record is a "
                                 "question of the QA evaluation; train on other data")
        loaded.append(Loaded(keep, src.skipped, src.files, src.sha256))
    parts = realize(nodes, loaded, total, eval_samples, seed)

    def pick(which: str) -> list[Example]:
        out = []
        for part in parts:
            convs = loaded[part.index].conversations
            for rec in getattr(part, which):
                c = convs[rec]
                out.append(Example(query_of(c), tuple(tuple(t) for t in c.turns), c.where,
                                   target_of(c)))
        return out

    info = {"blend": [p.summary() for p in parts], "excluded": excluded}
    return pick("train"), pick("eval"), info
