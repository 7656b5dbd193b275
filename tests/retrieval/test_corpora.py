"""Corpus components on real and hand-made files: grouping, limits, shards, bad input."""

from __future__ import annotations

import pytest

from retro.components.corpora.base import ReadStats
from retro.components.retrieval.common import build_component
from retro.platform.errors import InputDataError
from tests.retrieval.helpers import WIKI, corpus, wiki_records, write_jsonl


def _all_docs(c, scan):
    return [d for source, n in zip(scan.sources, scan.counts)
            for d in c.documents(source, 0, n)]


def test_wiki_passages_group_into_articles(shared_data):
    c = corpus(paths=[str(shared_data / WIKI)], max_documents=3)
    scan = c.scan()
    docs = _all_docs(c, scan)
    records = wiki_records(shared_data, 3)
    assert scan.n_docs == 3 and [d.doc_id for d in docs] == ["901", "1367", "1933"]
    assert docs[0].title == "Astatine"
    first = [r["text"] for r in records if r["doc_id"] == "901"]
    assert docs[0].text == " ".join(first)  # passages of one article joined back


def test_records_as_documents_and_title(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [
        {"id": "a", "doc_id": "1", "title": "T1", "text": "one"},
        {"id": "b", "doc_id": "1", "title": "T1", "text": "two"},
        {"id": "c", "doc_id": "2", "title": "T2", "text": "three"}])
    grouped = corpus(paths=[str(f)], prepend_title=True)
    docs = _all_docs(grouped, grouped.scan())
    assert [(d.doc_id, d.text) for d in docs] == [("1", "T1\none two"), ("2", "T2\nthree")]
    flat = corpus(paths=[str(f)], doc_id_field=None)
    assert [d.doc_id for d in _all_docs(flat, flat.scan())] == ["a", "b", "c"]


def test_globs_gzip_fraction_and_shards_keep_global_order(tmp_path):
    for i in range(3):
        write_jsonl(tmp_path / f"p{i}.jsonl.gz",
                    [{"doc_id": f"{i}-{j}", "text": f"doc {i} {j}"} for j in range(5)], gz=True)
    c = corpus(paths=[str(tmp_path / "p*.jsonl.gz")], fraction=0.6)
    scan = c.scan()
    assert scan.counts == [5, 4, 0]  # ceil(0.6 * 15) = 9 documents, in file order
    expected = [d.doc_id for d in _all_docs(c, scan)]
    for n in (1, 2, 4, 9):
        got = [c.documents(s, a, b) for pieces in scan.shards(n) for s, a, b in pieces]
        assert [d.doc_id for it in got for d in it] == expected


def test_non_utf8_line_errors_with_location_or_is_skipped_and_counted(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"doc_id": "1", "text": "fine"},
                                             b'{"doc_id": "2", "text": "caf\xe9"}',
                                             b"{not json",
                                             {"doc_id": "3", "text": "also fine"}])
    with pytest.raises(InputDataError, match=r"bad\.jsonl:2: not valid UTF-8.*on_bad_record"):
        corpus(paths=[str(f)]).scan()
    scan = corpus(paths=[str(f)], on_bad_record="skip").scan()
    assert scan.n_docs == 2 and scan.stats.bad_records == 2


def test_empty_documents_error_or_skip(tmp_path):
    f = write_jsonl(tmp_path / "e.jsonl", [{"doc_id": "1", "text": "x"},
                                           {"doc_id": "2", "text": "   "}])
    with pytest.raises(InputDataError, match=r"e\.jsonl:2: empty document text"):
        corpus(paths=[str(f)]).scan()
    scan = corpus(paths=[str(f)], on_empty="skip").scan()
    assert scan.n_docs == 1 and scan.stats.empty_records == 1


def test_unknown_text_field_names_the_fields(tmp_path):
    f = write_jsonl(tmp_path / "f.jsonl", [{"doc_id": "1", "body": "x"}])
    with pytest.raises(InputDataError, match=r"f\.jsonl:1: no field 'text'.*\['body', 'doc_id'\]"):
        corpus(paths=[str(f)]).scan()


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InputDataError, match="corpus.paths.0: file .* does not exist"):
        corpus(paths=[str(tmp_path / "nope.jsonl")]).scan()
    with pytest.raises(InputDataError, match="matches no file"):
        corpus(paths=[str(tmp_path / "*.jsonl")]).scan()
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(InputDataError, match="empty.jsonl is empty"):
        corpus(paths=[str(tmp_path / "empty.jsonl")]).scan()


def test_text_dir(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("bee")
    (tmp_path / "d" / "sub" / "a.txt").write_text("ay")
    (tmp_path / "d" / "c.txt").write_bytes(b"\xff\xfe")
    c = build_component("corpus", {"type": "text-dir", "path": str(tmp_path / "d"),
                                    "on_bad_record": "skip", "files_per_source": 1})
    scan = c.scan()
    assert [(d.doc_id, d.text) for d in _all_docs(c, scan)] == [("b.txt", "bee"),
                                                                ("sub/a.txt", "ay")]
    assert scan.stats.bad_records == 1


def test_hf_disk_rows_group_without_splitting_documents(tmp_path):
    import datasets

    rows = {"doc_id": ["a", "a", "a", "b", "c", "c"], "text": list("uvwxyz"),
            "title": ["A"] * 3 + ["B", "C", "C"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(
        str(tmp_path / "ds"))
    node = {"type": "hf-disk", "path": str(tmp_path / "ds"), "split": "train",
            "rows_per_source": 2}  # row ranges cut through documents a and c
    c = build_component("corpus", node)
    docs = _all_docs(c, c.scan())
    assert [(d.doc_id, d.text) for d in docs] == [("a", "u v w"), ("b", "x"), ("c", "y z")]
    with pytest.raises(InputDataError, match="not a split"):
        build_component("corpus", {**node, "split": "test"}).scan()
    with pytest.raises(InputDataError, match="'body' is not a column"):
        build_component("corpus", {**node, "text_field": "body"}).scan()


def test_read_stats_merge():
    a, b = ReadStats(1, 0, "x:1"), ReadStats(2, 3, "y:2")
    a.add(b)
    assert (a.bad_records, a.empty_records, a.first_bad) == (3, 3, "x:1")


def test_max_documents_per_source_takes_the_first_n_of_every_file(tmp_path):
    """Two files: the first N documents of each, in order; then max_documents over the rest."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": f"a{i}", "doc_id": f"a{i}", "text": f"a {i}"}
                                           for i in range(5)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": f"b{i}", "doc_id": f"b{i}", "text": f"b {i}"}
                                           for i in range(4)])
    both = corpus(paths=[str(a), str(b)], max_documents_per_source=2)
    scan = both.scan()
    assert scan.counts == [2, 2]
    assert [d.doc_id for d in _all_docs(both, scan)] == ["a0", "a1", "b0", "b1"]
    assert [d.doc_id for d in both.iter_all()] == ["a0", "a1", "b0", "b1"]
    capped = corpus(paths=[str(a), str(b)], max_documents_per_source=3, max_documents=4)
    assert [d.doc_id for d in _all_docs(capped, capped.scan())] == ["a0", "a1", "a2", "b0"]
    half = corpus(paths=[str(a), str(b)], max_documents_per_source=4, fraction=0.5)
    assert half.scan().counts == [4, 0]                   # ceil(0.5 x (4 + 4)) in order


def test_an_unset_per_source_cap_leaves_the_corpus_dump_unchanged(tmp_path):
    """Stage keys hash the corpus node's dump: the new field must not enter it unset."""
    f = write_jsonl(tmp_path / "a.jsonl", [{"id": "a", "text": "x"}])
    assert "max_documents_per_source" not in corpus(paths=[str(f)]).config.model_dump()
    assert corpus(paths=[str(f)], max_documents_per_source=3).config.model_dump()[
        "max_documents_per_source"] == 3
