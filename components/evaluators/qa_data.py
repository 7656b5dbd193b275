"""Open-domain QA datasets under the shared data folder (each has a PROVENANCE.md).

    nq_open        nq_open/nq_open_test.jsonl.gz          NQ-open test (ORQA/DPR split)
    triviaqa_open  triviaqa_open/triviaqa_test.jsonl.gz   TriviaQA unfiltered (DPR "test")
    squad_v2       squad_v2_cs224n/questions.jsonl.gz     SQuAD 2.0 dev, answerable part only,
                   + paragraphs.jsonl.gz                  reading comprehension: each question
                                                          comes with its own paragraph
                                                          (InstructRetro Table 1's setting)
    squad_v2_open  the same questions, open-domain: answered from retrieved passages
    webquestions   webquestions/webquestions_test.jsonl.gz
    nq_open_oracle nq_open_oracle/questions.jsonl.gz      NQ-open test questions whose gold
                                                          passage is in its gold_passages

A reading-comprehension dataset (READING_COMPREHENSION) gives each example a `context`: the
dataset's paragraph, which eval-qa uses instead of retrieved passages (REFERENCE §5.1: "all other
tasks use the contexts supplied with the dataset").

Questions are taken in file order (the files are fixed deterministic subsets), so `limit: 200`
always means the same 200 questions.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

from retro.platform.errors import InputDataError

DatasetName = Literal["nq_open", "triviaqa_open", "squad_v2", "squad_v2_open", "webquestions",
                      "nq_open_oracle"]

FILES: dict[str, str] = {
    "nq_open": "nq_open/nq_open_test.jsonl.gz",
    "triviaqa_open": "triviaqa_open/triviaqa_test.jsonl.gz",
    "squad_v2": "squad_v2_cs224n/questions.jsonl.gz",
    "squad_v2_open": "squad_v2_cs224n/questions.jsonl.gz",
    "webquestions": "webquestions/webquestions_test.jsonl.gz",
    "nq_open_oracle": "nq_open_oracle/questions.jsonl.gz",
}

# InstructRetro's task names (its prompt code picks the short-span format by these).
TASK_NAMES = {"nq_open": "nq", "triviaqa_open": "tqa", "squad_v2": "squad2.0",
              "squad_v2_open": "squad2.0",
              "webquestions": "webquestions", "nq_open_oracle": "nq"}


# dataset -> file of its paragraphs ({id, title, text}); questions name theirs by `paragraph_id`
READING_COMPREHENSION: dict[str, str] = {"squad_v2": "squad_v2_cs224n/paragraphs.jsonl.gz"}


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    answers: list[str]
    context: Optional[dict] = None
    """Reading comprehension: the dataset's own passage {paragraph_id, title, text}."""

    def to_json(self) -> dict:
        out = asdict(self)
        if self.context is None:
            del out["context"]
        return out


def load_questions(data_dir: str | Path, name: str, limit: int | None = None,
                   answer_in_corpus: bool = False) -> list[QAExample]:
    """The first `limit` usable questions of dataset `name`.

    Args:
        data_dir: the shared data folder (holding `nq_open/`, `triviaqa_open/`, ...).
        name: one of `FILES`.
        limit: keep at most this many questions (None: all).
        answer_in_corpus: keep only questions flagged `answer_in_wiki_featured` (a gold answer
            string occurs somewhere in the wiki_featured_passages corpus).

    Raises:
        InputDataError: the file is missing or a line is not a QA record.
    """
    path = Path(data_dir) / FILES[name]
    if not path.is_file():
        raise InputDataError(f"QA dataset {name!r}: {path} does not exist; set the evaluator's "
                             f"`data_dir` to the folder holding {FILES[name].split('/')[0]}/")
    out: list[QAExample] = []
    paragraphs = _paragraphs(data_dir, name)
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if limit is not None and len(out) >= limit:
                break
            try:
                row = json.loads(line)
                answers = [a for a in row["answers"] if isinstance(a, str) and a.strip()]
                if row.get("is_impossible") or not answers:
                    continue  # SQuAD v2 unanswerable questions have no gold answer
                if answer_in_corpus and not row.get("answer_in_wiki_featured", True):
                    continue
                out.append(QAExample(str(row["id"]), row["question"].strip(), answers,
                                     _context(paragraphs, row, path, lineno)))
            except (ValueError, KeyError, TypeError) as e:
                raise InputDataError(f"{path}:{lineno}: not a QA record ({e}); expected JSON "
                                     "with `id`, `question`, `answers`") from None
    return out


def _paragraphs(data_dir: str | Path, name: str) -> Optional[dict[str, dict]]:
    """Paragraph id -> {paragraph_id, title, text} of a reading-comprehension dataset."""
    if name not in READING_COMPREHENSION:
        return None
    path = Path(data_dir) / READING_COMPREHENSION[name]
    if not path.is_file():
        raise InputDataError(f"QA dataset {name!r} is reading comprehension and needs its "
                             f"paragraphs: {path} does not exist; use `{name}_open` to answer "
                             "from retrieved passages instead")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        rows = (json.loads(line) for line in fh if line.strip())
        return {r["id"]: {"paragraph_id": r["id"], "title": r.get("title", ""),
                          "text": r["text"]} for r in rows}


def _context(paragraphs: Optional[dict[str, dict]], row: dict, path: Path,
             lineno: int) -> Optional[dict]:
    if paragraphs is None:
        return None
    pid = row.get("paragraph_id")
    if pid not in paragraphs:
        raise InputDataError(f"{path}:{lineno}: paragraph_id {pid!r} is not in the dataset's "
                             "paragraphs file")
    return paragraphs[pid]
