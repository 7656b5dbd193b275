"""RA-DIT training data: the `qa-pairs` source, the background layout, and the removal of the
QA evaluation's questions from training."""

from __future__ import annotations

import gzip
import json

import pytest

from retro.components.instruct.render import render
from retro.components.radit.data import load_examples
from retro.components.evaluators.prompts import with_background
from retro.platform.errors import InputDataError
from retro.platform.registry import registry

registry.load_plugins()


def source(**fields):
    return registry.get("blend-source", "qa-pairs").node_model().model_validate(
        {"type": "qa-pairs", **fields})


def test_qa_pairs_render_like_the_qa_prompt_and_skip_eval_questions(tmp_path, shared_data):
    with gzip.open(shared_data / "nq_open" / "nq_open_test.jsonl.gz", "rt") as fh:
        test_q = [json.loads(line) for _, line in zip(range(3), fh)]
    rows = [{"question": test_q[1]["question"].upper() + "?", "answers": ["x"]},  # same, normalised
            {"question": "who wrote the iliad", "answers": ["Homer", "homer"]},
            {"question": "when did astatine get its name", "answer": "1947"},
            {"question": "no answer here", "answers": []}]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    exclude = [{"data_dir": str(shared_data), "datasets": ["nq_open"], "limit": 3,
                "answer_in_corpus": False}]
    train, held, info = load_examples([source(path=str(path))], 4, 0, seed=0, exclude=exclude)
    assert info["excluded"] == 1 and info["blend"][0]["skipped"] == 1
    assert {e.query for e in train} == {"who wrote the iliad", "when did astatine get its name"}
    assert len(train) == 4 and held == []                       # cycles through the 2 left
    ex = next(e for e in train if e.query == "who wrote the iliad")
    prompt, answer = render(with_background(ex.turns, " Homer wrote it. "), "System: S")
    assert prompt == ("System: S\n\nUser: Background: Homer wrote it.\n\nAnswer the following "
                      "question with a short span. who wrote the iliad\n\nAssistant:")
    assert answer == " The answer is Homer"


def test_every_record_excluded_is_an_error(tmp_path, shared_data):
    with gzip.open(shared_data / "nq_open" / "nq_open_test.jsonl.gz", "rt") as fh:
        q = json.loads(fh.readline())
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": q["question"], "answers": q["answers"]}) + "\n")
    exclude = [{"data_dir": str(shared_data), "datasets": ["nq_open"], "limit": 1}]
    with pytest.raises(InputDataError, match="every record is a question of the QA evaluation"):
        load_examples([source(path=str(path))], 2, 0, seed=0, exclude=exclude)
