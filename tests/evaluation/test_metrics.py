"""EM / token F1 / normalisation on hand-checked cases (SQuAD rules, REFERENCE §5.1)."""

import pytest

from retro.components.evaluators.metrics import (answer_in_text, exact_match, normalize_answer,
                                                 qa_scores, token_f1)


@pytest.mark.parametrize("text, expected", [
    ("The Eiffel Tower", "eiffel tower"),          # article + case
    ("  an   apple, a day!  ", "apple day"),       # articles, punctuation, spaces
    ("U.S.A.", "usa"),                             # punctuation inside a token
    ("Theatre", "theatre"),                        # 'the' inside a word stays
    ("", ""),
])
def test_normalize(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_ignores_articles_punctuation_case():
    assert exact_match("the Beatles.", "Beatles") == 1.0
    assert exact_match("Beatles band", "Beatles") == 0.0


def test_f1_partial_overlap_hand_computed():
    # pred tokens: [barack, obama, jr]; gold: [barack, obama] -> P=2/3, R=1, F1=0.8
    assert token_f1("Barack Obama Jr.", "Barack Obama") == pytest.approx(0.8)
    # pred [in, 1969]; gold [july, 1969]: common 1 -> P=1/2 R=1/2 F1=0.5
    assert token_f1("in 1969", "July 1969") == pytest.approx(0.5)
    # repeated tokens count once per occurrence: pred [new, new, york], gold [new, york]
    # common = min(2,1)+1 = 2 -> P=2/3, R=1 -> 0.8
    assert token_f1("new new york", "New York") == pytest.approx(0.8)


def test_max_over_multiple_golds():
    s = qa_scores("JFK", ["John F. Kennedy", "JFK", "Kennedy"])
    assert s == {"em": 1.0, "f1": 1.0}
    s = qa_scores("President Kennedy", ["John F. Kennedy", "Kennedy"])
    # vs "kennedy": P=1/2 R=1 -> 2/3; vs "john f kennedy": P=1/2 R=1/3 -> 0.4
    assert s["em"] == 0.0 and s["f1"] == pytest.approx(2 / 3)


def test_empty_prediction_scores_zero_and_empty_gold_list():
    assert qa_scores("", ["Paris"]) == {"em": 0.0, "f1": 0.0}
    assert token_f1("", "") == 1.0                  # SQuAD v2: both empty agree
    assert token_f1("the", "") == 1.0               # 'the' normalises to empty
    assert qa_scores("Paris", []) == {"em": 0.0, "f1": 0.0}


def test_answer_in_text_whole_tokens():
    passage = "Apollo 11 landed on the Moon in July 1969, commanded by Neil Armstrong."
    assert answer_in_text(passage, ["neil armstrong"])
    assert answer_in_text(passage, ["Buzz", "1969"])
    assert not answer_in_text(passage, ["196"])     # no partial-token match
    assert not answer_in_text(passage, ["", "the"])  # empty after normalisation never matches
