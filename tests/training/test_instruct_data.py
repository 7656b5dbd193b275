"""Instruction data: every format on the real files, rendering, answer-only masks, the blend,
and the errors a user gets before any training starts."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import yaml

from retro.components.instruct.blend import counts, realize, write_rows
from retro.components.instruct.render import SYSTEM, encode, render
from retro.components.instruct.sources import load_source
from retro.components.training.data import TokenRows
from retro.platform.errors import InputDataError, SpecError, UserError
from retro.platform.registry import registry
from retro.platform.spec import load_spec

registry.load_plugins()


def source(kind, path, **fields):
    return registry.get("blend-source", kind).node_model().model_validate(
        {"type": kind, "path": str(path), **fields})


@pytest.fixture(scope="module")
def gpt2_tok():
    from transformers import GPT2TokenizerFast

    from tests.conftest import SHARED_DATA

    return GPT2TokenizerFast.from_pretrained(str(SHARED_DATA / "tokenizer_gpt2"))


REAL = [  # format, path under shared data, usable records, skipped
    ("alpaca", "alpaca_5000/alpaca_5000.json.gz", 4998, 2),      # 2 empty outputs
    ("dolly", "dolly_hhrlhf_sample/dolly_hhrlhf_train_small.jsonl.gz", 1000, 0),
    ("oasst", "oasst_en100/en_100_tree.jsonl", 95, 5),
    ("flan-cot", "flan_cot/gsm8k_train.tsv.gz", 7473, 0),
    ("p3", "p3_t0_sample/t0_train_sample.jsonl.gz", 2748, 70),
    ("self-instruct", "self_instruct/seed_tasks.jsonl", 175, 0),
    ("lima", "lima/lima.json.gz", 1029, 0),
]


@pytest.mark.parametrize("kind,rel,usable,skipped", REAL, ids=[r[0] for r in REAL])
def test_every_format_loads_its_real_data(shared_data, kind, rel, usable, skipped):
    loaded = load_source(source(kind, shared_data / rel))
    assert (len(loaded.conversations), loaded.skipped) == (usable, skipped)
    assert len(loaded.sha256) == 64
    for conv in loaded.conversations[:50]:
        assert conv.turns and all(u and a for u, a in conv.turns)


def test_format_specific_parsing(shared_data):
    dolly = load_source(source("dolly", shared_data / "dolly_hhrlhf_sample" /
                               "dolly_hhrlhf_train_small.jsonl.gz")).conversations
    assert dolly[0].turns[0][0] == "what is kangen water?"          # Alpaca frame removed
    flan = load_source(source("flan-cot", shared_data / "flan_cot" / "gsm8k_train.tsv.gz"))
    user, answer = flan.conversations[0].turns[0]
    assert user.startswith("Natalia sold clips") and answer.endswith("So the answer is 72.")
    custom = load_source(source("flan-cot", shared_data / "flan_cot" / "gsm8k_train.tsv.gz",
                                template={"user": "Q: {question}", "assistant": "{answer}"}))
    assert custom.conversations[0].turns[0] == (user.split("\n")[0].replace(
        "Natalia", "Q: Natalia", 1), "72")
    lima = load_source(source("lima", shared_data / "lima" / "lima.json.gz")).conversations
    assert max(len(c.turns) for c in lima) > 1                      # history kept
    both = load_source(source("self-instruct", shared_data / "self_instruct" / "*.jsonl"))
    assert len(both.conversations) == 175 + 252 and len(both.files) == 2  # one per instance


def test_oasst_takes_the_best_ranked_path(tmp_path):
    def msg(role, text, rank=None, replies=(), **kw):
        return {"role": role, "text": text, "rank": rank, "replies": list(replies), **kw}

    tree = {"prompt": msg("prompter", "Q1", replies=[
        msg("assistant", "worse", rank=1),
        msg("assistant", "deleted", rank=0, deleted=True),
        msg("assistant", "best", rank=0, replies=[
            msg("prompter", "Q2", replies=[msg("assistant", "A2-second", rank=1),
                                           msg("assistant", "A2", rank=0)])])])}
    (tmp_path / "t.jsonl").write_text(json.dumps(tree) + "\n")
    conv = load_source(source("oasst", tmp_path / "t.jsonl")).conversations
    assert [c.turns for c in conv] == [[("Q1", "best"), ("Q2", "A2")]]


def test_answer_only_loss_mask_on_a_rendered_conversation(gpt2_tok):
    turns = [("What is 2+2?", "4."), ("And times 3?", "It is 12.")]
    prompt, answer = render(turns)
    assert prompt == (f"{SYSTEM}\n\nUser: What is 2+2?\n\nAssistant: 4.\n\n"
                      "User: And times 3?\n\nAssistant:")
    assert answer == " It is 12."
    eod = gpt2_tok.eos_token_id
    tokenize = lambda s: gpt2_tok.encode(s, add_special_tokens=False)  # noqa: E731
    tokens, mask, cut = encode(turns, tokenize, eod, seq_length=96)
    assert not cut and tokens.shape == mask.shape == (97,)
    counted = tokens[mask == 1]
    assert gpt2_tok.decode(counted[:-1]) == " It is 12." and counted[-1] == eod
    n_prompt = len(tokenize(prompt))
    assert not mask[:n_prompt].any()                      # system, earlier turns, question
    first_pad = n_prompt + len(tokenize(answer)) + 1
    assert (tokens[first_pad:] == eod).all() and not mask[first_pad:].any()   # padding
    # the loop scores exactly those tokens: label t-1 -> token t
    batch = TokenRows(tokens[None], 96, loss_mask=mask[None]).batch(np.array([0]))
    scored = batch["labels"][0][batch["loss_mask"][0] == 1].numpy()
    np.testing.assert_array_equal(scored, counted)


def test_too_long_samples_keep_the_question_and_cut_the_answer_tail():
    tokenize = lambda s: [ord(c) for c in s]               # noqa: E731 - one token per char
    turns = [("x" * 300 + " the question?", "y" * 300)]
    tokens, mask, cut = encode(turns, tokenize, 0, seq_length=128)
    text = "".join(map(chr, tokens[mask == 0][:64]))
    assert cut and text.endswith("the question?\n\nAssistant:")
    assert mask.sum() == 64 + 1 and mask[-1] == 1          # half the row + its EOD


def test_blend_counts_samples_epochs_and_weights(tmp_path):
    nodes = [source("alpaca", "a", samples=10), source("alpaca", "b", epochs=2.0),
             source("alpaca", "c", weight=3), source("alpaca", "d")]
    assert counts(nodes, [100, 7, 50, 50], 100) == [10, 14, 57, 19]
    with pytest.raises(UserError, match="leaving nothing for the weighted"):
        counts(nodes, [100, 50, 5, 5], 100)


def test_realized_blend_is_seeded_and_holds_out_eval_records(shared_data, gpt2_tok, tmp_path):
    nodes = [source("alpaca", shared_data / "alpaca_5000" / "alpaca_5000.json.gz", weight=3),
             source("oasst", shared_data / "oasst_en100" / "en_100_tree.jsonl", epochs=2.0)]
    loaded = [load_source(n) for n in nodes]
    parts = realize(nodes, loaded, total=400, eval_samples=20, seed=1)
    again = realize(nodes, loaded, total=400, eval_samples=20, seed=1)
    assert [p.train for p in parts] == [p.train for p in again]
    assert [p.summary()["samples"] for p in parts] == [210, 190]
    assert sum(p.summary()["eval_samples"] for p in parts) == 20
    for p in parts:
        assert not set(p.train) & set(p.eval)
    stats = write_rows(parts, loaded, "train", tmp_path / "train",
                       lambda s: gpt2_tok.encode(s, add_special_tokens=False),
                       gpt2_tok.eos_token_id, 256)
    tokens = np.load(tmp_path / "train_tokens.npy")
    assert tokens.shape == (400, 257) and stats["rows"] == 400
    assert 0 < stats["loss_tokens"] < tokens.size


# ---------------------------------------------------------------------- bad input, early
def _spec(tmp_path, blend, **instruct):
    spec = {"name": "bad-blend", "recipe": {"type": "toy"},
            "instruct": {"blend": blend, **instruct}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_spec_errors_name_the_blend_entry(tmp_path):
    with pytest.raises(SpecError) as err:
        load_spec(_spec(tmp_path, [
            {"type": "csv-rows", "path": "x"},
            {"type": "alpaca", "path": "x", "weight": 0},
            {"type": "alpaca", "path": "x", "weight": 1, "samples": 5},
            {"type": "flan-cot", "path": "x", "template": {"user": "{query}"}},
            {"type": "dolly"},
        ]))
    text = str(err.value)
    assert "instruct.blend.0.type" in text and "unknown blend-source component 'csv-rows'" in text
    assert "alpaca" in text and "oasst" in text                       # the known formats
    assert "instruct.blend.1.weight" in text and "greater than 0" in text
    assert "give one of weight, samples, epochs" in text
    assert "unknown field(s) ['query']" in text
    assert "instruct.blend.4.path" in text


def test_data_errors_name_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n"
                   + json.dumps({"prompt": "only a prompt"}) + "\n")
    with pytest.raises(InputDataError, match=r"bad.jsonl:2: p3 record is missing field\(s\) "
                                             r"\['completion'\]"):
        load_source(source("p3", bad))
    empty = tmp_path / "empty.jsonl.gz"
    with gzip.open(empty, "wt") as fh:
        fh.write(json.dumps({"prompt": "p", "completion": "<|endoftext|>"}) + "\n")
    with pytest.raises(InputDataError, match="has no usable record.*1 skipped"):
        load_source(source("p3", empty))
    with pytest.raises(InputDataError, match="names no file"):
        load_source(source("alpaca", tmp_path / "nowhere" / "*.json"))
    tsv = tmp_path / "cot.tsv"
    tsv.write_text("q\ta\n")
    with pytest.raises(InputDataError, match="cot.tsv:1: flan-cot rows have 3"):
        load_source(source("flan-cot", tsv))


# ---------------------------------------------------------------------- QA test questions
def test_blend_records_asking_qa_eval_questions_are_dropped_and_counted(shared_data):
    """RA-DIT removes the evaluation questions from its fine-tuning data (REFERENCE §6); the
    instructretro recipe does the same (issue 13 defect 13). A blend holding NQ-open test
    questions loses exactly those the spec's qa evaluator asks (its first `limit`)."""
    import retro.components.radit.data  # noqa: F401  (registers the qa-pairs format)
    from retro.components.evaluators.qa_data import load_questions
    from retro.components.instruct.holdout import drop_eval_questions, eval_questions

    nq = shared_data / "nq_open" / "nq_open_test.jsonl.gz"
    nodes = [source("qa-pairs", nq, max_records=30),
             source("alpaca", shared_data / "alpaca_5000" / "alpaca_5000.json.gz")]
    loaded = [load_source(n) for n in nodes]
    sets = [{"data_dir": str(shared_data), "datasets": ["nq_open"], "limit": 12,
             "answer_in_corpus": False}]
    kept, dropped = drop_eval_questions(nodes, loaded, eval_questions(sets))
    asked = {e.question for e in load_questions(shared_data, "nq_open", 12)}
    assert dropped == 12
    assert len(kept[0].conversations) == 30 - 12
    assert not {c.query for c in kept[0].conversations} & asked
    assert len(kept[1].conversations) == len(loaded[1].conversations)   # alpaca untouched


def test_instructretro_recipe_passes_the_qa_questions_to_sft():
    from pathlib import Path

    from retro.platform.api import validate

    _, plan = validate(Path(__file__).resolve().parents[2] / "specs/instructretro-48b.yaml")
    sft = [s for s in plan.stages if s.stage == "instruct"]
    assert len(sft) == 2                                       # instruct-retro, instruct-gpt
    for s in sft:
        (sets,) = s.params["exclude_questions"]
        assert sets["datasets"] == ["nq_open", "triviaqa_open", "squad_v2", "webquestions"]
        assert sets["limit"] == 3000
