"""Open-domain QA datasets under the shared data folder (each has a PROVENANCE.md).

    nq_open        nq_open/nq_open_test.jsonl.gz          NQ-open test (ORQA/DPR split)
    triviaqa_open  triviaqa_open/triviaqa_test.jsonl.gz   TriviaQA unfiltered (DPR "test")
    squad_v2       squad_v2_cs224n/questions.jsonl.gz     SQuAD 2.0 dev, answerable part only
    webquestions   webquestions/webquestions_test.jsonl.gz
    nq_open_oracle nq_open_oracle/questions.jsonl.gz      NQ-open test questions whose gold
                                                          passage is in its gold_passages

Questions are taken in file order (the files are fixed deterministic subsets), so `limit: 200`
always means the same 200 questions.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from retro.platform.errors import InputDataError

DatasetName = Literal["nq_open", "triviaqa_open", "squad_v2", "webquestions", "nq_open_oracle"]

FILES: dict[str, str] = {
    "nq_open": "nq_open/nq_open_test.jsonl.gz",
    "triviaqa_open": "triviaqa_open/triviaqa_test.jsonl.gz",
    "squad_v2": "squad_v2_cs224n/questions.jsonl.gz",
    "webquestions": "webquestions/webquestions_test.jsonl.gz",
    "nq_open_oracle": "nq_open_oracle/questions.jsonl.gz",
}

# InstructRetro's task names (its prompt code picks the short-span format by these).
TASK_NAMES = {"nq_open": "nq", "triviaqa_open": "tqa", "squad_v2": "squad2.0",
              "webquestions": "webquestions", "nq_open_oracle": "nq"}


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    answers: list[str]

    def to_json(self) -> dict:
        return asdict(self)


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
                out.append(QAExample(str(row["id"]), row["question"].strip(), answers))
            except (ValueError, KeyError, TypeError) as e:
                raise InputDataError(f"{path}:{lineno}: not a QA record ({e}); expected JSON "
                                     "with `id`, `question`, `answers`") from None
    return out
