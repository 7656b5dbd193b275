"""Asynchronous index refresh (issue 17, point 2): policies, content addressing, the Ray actor
really running while training steps run, atomic swaps, and resume after a crash mid-refresh.

A tiny random BertModel (MiniLM's tokenizer, 32-d) stands in for the document tower; one test
uses the real MiniLM to check a refresh reproduces the `hf-mean-pool` embedder exactly.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

from retro.components.joint.live_index import IndexSnapshot, LiveIndex
from retro.components.joint.refresh import IndexRefresher, RefreshFailed, snapshot_digest
from retro.components.joint.refresh_config import RefreshConfig, should_refresh
from retro.platform.errors import ArtifactError

TEXTS = [f"passage {i} on subject {i % 7} with detail {i % 11} and {i * 37 % 101}"
         for i in range(240)]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tiny random BERT saved with MiniLM's tokenizer (seeded: the same weights every run)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from retro.components.retrieval.embedders import default_model_path

    path = tmp_path_factory.mktemp("tiny-encoder")
    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _state(encoder_dir, noise: float = 0.0, seed: int = 1) -> dict:
    """The encoder's state dict, every float tensor shifted by seeded noise of std `noise`."""
    from transformers import AutoModel

    state = AutoModel.from_pretrained(encoder_dir).state_dict()
    g = torch.Generator().manual_seed(seed)
    return {k: (v + noise * torch.randn(v.shape, generator=g) if v.is_floating_point() and noise
                else v) for k, v in state.items()}


def _refresher(root, encoder_dir, **kw) -> IndexRefresher:
    kw = {"max_length": 32, "batch_size": 8, "sort_window": 2, "precision": "fp32", "shards": 4,
          "backend": "thread", **kw}
    return IndexRefresher(root, TEXTS, "corpus-v1", str(encoder_dir), **kw)


# -- policies ----------------------------------------------------------------------------------
def test_policies_decide_as_documented():
    every = RefreshConfig(policy="every", every=3)
    assert [should_refresh(every, s, 0, None, False) for s in range(1, 5)] == \
        [False, False, True, True]
    assert not should_refresh(every, 6, 3, None, True)             # one refresh at a time
    assert should_refresh(every, 6, 3, None, False)
    stale = RefreshConfig(policy="staleness", threshold=0.8)
    assert should_refresh(stale, 5, 0, 0.7, False)
    assert not should_refresh(stale, 5, 0, 0.8, False)              # strictly below
    assert not should_refresh(stale, 5, 0, None, False)             # not measured this step
    assert not should_refresh(stale, 5, 0, 0.1, True)
    for policy in ("query_side_only", "never"):
        assert not should_refresh(RefreshConfig(policy=policy), 100, 0, 0.0, False)
    assert not RefreshConfig(policy="query_side_only").trains_doc_encoder
    assert RefreshConfig(policy="never").trains_doc_encoder


@pytest.mark.parametrize("kw, words", [({"policy": "every"}, "needs `every"),
                                       ({"policy": "staleness", "every": 5}, "only read"),
                                       ({"probe_k": 20, "probe_docs": 10}, "probe_k")])
def test_bad_refresh_nodes_say_how_to_fix(kw, words):
    with pytest.raises(ValueError, match=words):
        RefreshConfig(**kw)


# -- content addressing --------------------------------------------------------------------------
def test_digest_keys_the_encoder_snapshot(encoder_dir):
    s0, s1 = _state(encoder_dir), _state(encoder_dir)
    assert snapshot_digest(s0, "c", "Flat") == snapshot_digest(s1, "c", "Flat")
    name = next(k for k, v in s1.items() if v.is_floating_point())
    s1[name] = s1[name].clone()
    s1[name].view(-1)[0] += 1e-3                       # one weight moved
    assert snapshot_digest(s0, "c", "Flat") != snapshot_digest(s1, "c", "Flat")
    assert snapshot_digest(s0, "c", "Flat") != snapshot_digest(s0, "d", "Flat")
    assert snapshot_digest(s0, "c", "Flat") != snapshot_digest(s0, "c", "HNSW32,Flat")


def test_refresh_equals_the_embedder_and_is_not_redone(tmp_path, encoder_dir):
    from retro.components.retrieval.embedders import HFMeanPoolEmbedder

    r = _refresher(tmp_path, encoder_dir)
    snap = r.build_now(_state(encoder_dir), step=0)
    emb = HFMeanPoolEmbedder(HFMeanPoolEmbedder.Config(model=str(encoder_dir), max_length=32,
                                                       batch_size=8, sort_window=2,
                                                       precision="fp32"))
    expected = emb.embed(TEXTS)
    np.testing.assert_array_equal(snap.embeddings(), expected)
    assert snap.meta["n_docs"] == len(TEXTS) and snap.meta["shards"] == 4
    assert sorted(p.name for p in snap.path.iterdir()) == ["embeddings.npy", "index.faiss",
                                                           "meta.json"]    # shards cleaned
    # Flat inner-product index: the top-1 of a document's own vector is that document.
    _, ids = LiveIndex(snap).search(expected[:20], 1)
    assert ids[:, 0].tolist() == list(range(20))
    # The trainer-side embedding of a probe (one whole window here) is the refresh's, bit for bit.
    np.testing.assert_array_equal(r.embed(_state(encoder_dir), TEXTS[16:32]),
                                  snap.embeddings()[16:32])
    again = r.build_now(_state(encoder_dir), step=7)       # same snapshot: a cache hit
    assert again.digest == snap.digest and again.meta["started_at"] == snap.meta["started_at"]
    r.close()


def test_a_state_of_another_encoder_is_a_clear_error(tmp_path, encoder_dir):
    from retro.platform.errors import UserError

    state = _state(encoder_dir)
    state.pop(next(iter(state)))
    r = _refresher(tmp_path, encoder_dir)
    with pytest.raises(UserError, match="does not fit the refresher's encoder"):
        r.build_now(state, 0)
    assert not r.in_flight() and r.build_now(_state(encoder_dir), 0).meta["n_docs"] == len(TEXTS)
    r.close()


# -- asynchrony (Ray actor) ----------------------------------------------------------------------
def test_training_steps_run_while_the_actor_refreshes(tmp_path, encoder_dir, ray_session):
    # 20x the corpus: on an idle machine the 240 texts refreshed in 0.03 s, less than one step
    kw = {"max_length": 32, "batch_size": 8, "sort_window": 2, "precision": "fp32", "shards": 4}
    r = IndexRefresher(tmp_path, TEXTS * 20, "corpus-x20", str(encoder_dir), backend="ray",
                       threads=1, **kw)
    assert r.backend == "ray"
    r.build_now(_state(encoder_dir), 0)               # actor started (imports torch) before timing
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(32, 64)
    t_submit = time.time()
    r.submit(_state(encoder_dir, noise=0.05), step=1)
    t_returned = time.time()
    steps, snap = [], None
    while snap is None:                                # the "training loop" against the old index
        t0 = time.time()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps.append((t0, time.time()))
        snap = r.poll()
    r.close()
    started, finished = snap.meta["started_at"], snap.meta["finished_at"]
    inside = [s for s in steps if started <= s[0] and s[1] <= finished]
    assert snap.meta["pid"] != os.getpid()             # embedded in another process
    assert t_returned - t_submit < snap.meta["seconds"]  # submit did not wait for the refresh
    assert len(inside) >= 2, (len(steps), snap.meta["seconds"])
    assert snap.meta["shards_reused"] == 0 and snap.step == 1


# -- atomic swap -------------------------------------------------------------------------------
def test_searches_never_see_a_half_swapped_index(tmp_path, encoder_dir):
    r = _refresher(tmp_path, encoder_dir)
    a = r.build_now(_state(encoder_dir), 0)
    b = r.build_now(_state(encoder_dir, noise=0.5), 1)
    r.close()
    q = a.embeddings()[::7].copy()
    expect = {s.digest: LiveIndex(s).search(q, 5) for s in (a, b)}
    assert not np.array_equal(expect[a.digest][1], expect[b.digest][1])
    live, stop, seen, bad = LiveIndex(a), threading.Event(), {a.digest: 0, b.digest: 0}, []

    def hammer():
        while not stop.is_set():
            scores, ids, snap = live.search_with_snapshot(q, 5)
            want_s, want_i = expect[snap.digest]
            if not (np.array_equal(ids, want_i) and np.array_equal(scores, want_s)):
                bad.append(snap.digest)
            seen[snap.digest] += 1

    thread = threading.Thread(target=hammer)
    thread.start()
    deadline = time.time() + 60
    for i in range(100_000):                      # >= 300 swaps, until both were searched often
        live.swap(b if i % 2 == 0 else a)
        time.sleep(0.0002)                        # let the searcher in between swaps
        if i >= 300 and min(seen.values()) >= 50 or time.time() > deadline:
            break
    stop.set()
    thread.join()
    assert not bad, f"{len(bad)} searches mixed two snapshots"
    assert min(seen.values()) >= 50, seen
    live.swap(a)
    half = IndexSnapshot(digest="0" * 64, path=tmp_path / ("0" * 64), step=2)
    (tmp_path / half.digest).mkdir()
    np.save(tmp_path / half.digest / "embeddings.npy", np.zeros((3, 32), np.float32))
    with pytest.raises(ArtifactError, match="meta.json"):
        live.swap(half)                                # no meta.json: not a finished index
    assert live.digest == a.digest


def test_resume_loads_the_index_last_used(tmp_path, encoder_dir):
    r = _refresher(tmp_path, encoder_dir)
    snap = r.build_now(_state(encoder_dir, noise=0.2), 5)
    r.close()
    q = snap.embeddings()[:10].copy()
    resumed = LiveIndex.load(tmp_path, snap.digest)    # what a checkpoint's digest restores
    assert resumed.snapshot.step == 5
    np.testing.assert_array_equal(resumed.search(q, 4)[1], LiveIndex(snap).search(q, 4)[1])
    old = r.build_now(_state(encoder_dir), 0)
    assert r.prune({snap.digest}) == [old.digest]      # older refreshes can be dropped
    assert sorted(p.name for p in tmp_path.iterdir()) == [snap.digest]


# -- crash mid-refresh -------------------------------------------------------------------------
def test_a_killed_refresh_resumes_with_its_finished_shards(tmp_path, encoder_dir, ray_session):
    state = _state(encoder_dir, noise=0.1)
    clean = _refresher(tmp_path / "clean", encoder_dir, shards=5).build_now(state, 3)

    # The actor process dies (os._exit) after 2 of 5 shards, a half-written temp file behind it;
    # the refresher starts a fresh actor, which reuses the 2 shards.
    r = _refresher(tmp_path / "crash", encoder_dir, shards=5, backend="ray",
                   crash_after_shards=2, max_retries=1)
    r.submit(state, 3)
    snap = r.wait()
    r.close()
    assert snap.meta["retries"] == 1 and snap.meta["shards_reused"] == 2
    assert snap.digest == clean.digest
    assert sorted(p.name for p in snap.path.iterdir()) == ["embeddings.npy", "index.faiss",
                                                           "meta.json"]   # temp file gone too
    np.testing.assert_array_equal(snap.embeddings(), clean.embeddings())

    # The trainer dies (in-process worker, no retry); a new refresher finds the 3 shards.
    r = _refresher(tmp_path / "restart", encoder_dir, shards=5, crash_after_shards=3,
                   max_retries=0)
    digest = r.submit(state, 3)
    with pytest.raises(RefreshFailed, match="finished shards"):
        r.wait()
    r.close()
    left = sorted(p.name for p in (tmp_path / "restart" / digest).iterdir())
    assert len([n for n in left if n.startswith("shard-")]) == 3 and "meta.json" not in left
    with pytest.raises(ArtifactError):
        LiveIndex.load(tmp_path / "restart", digest)
    again = _refresher(tmp_path / "restart", encoder_dir, shards=5).build_now(state, 3)
    assert again.meta["shards_reused"] == 3 and again.meta["retries"] == 0
    np.testing.assert_array_equal(again.embeddings(), clean.embeddings())


# -- the real MiniLM ---------------------------------------------------------------------------
def test_minilm_refresh_reproduces_the_db_embeddings(tmp_path):
    """With the untrained MiniLM tower, a refresh equals the `hf-mean-pool` embedder (the
    initial index can be the DB's own embeddings); `auto` precision is part of the digest."""
    from transformers import AutoModel

    from retro.components.precision import resolve_precision
    from retro.components.retrieval.embedders import HFMeanPoolEmbedder, default_model_path

    path = default_model_path()
    texts = TEXTS[:40]
    r = IndexRefresher(tmp_path, texts, "c", path, max_length=64, precision="fp32",
                       backend="thread", shards=2)
    state = AutoModel.from_pretrained(path).state_dict()
    snap = r.build_now(state, 0)
    r.close()
    emb = HFMeanPoolEmbedder(HFMeanPoolEmbedder.Config(max_length=64, precision="fp32"))
    np.testing.assert_array_equal(snap.embeddings(), emb.embed(texts))
    auto = IndexRefresher(tmp_path, texts, "c", path, max_length=64, precision="auto",
                          backend="thread")
    assert (auto.digest(state) == r.digest(state)) == (resolve_precision("auto") == "fp32")


# -- staleness of a real refresh -----------------------------------------------------------------
def test_probe_staleness_matches_a_full_refresh(tmp_path, encoder_dir):
    """The probe's fresh embeddings (`IndexRefresher.embed`, in the trainer's process) are the
    ones a refresh would write, so over the whole corpus the probe recall equals the recall of
    the stale index against the refreshed one; the unperturbed tower scores exactly 1."""
    from retro.components.joint.staleness import StalenessProbe, staleness_recall

    r = _refresher(tmp_path, encoder_dir)
    stale = r.build_now(_state(encoder_dir), 0)
    moved = _state(encoder_dir, noise=0.3)
    fresh = r.build_now(moved, 1)
    r.close()
    queries = [f"subject {i % 7} detail {i}" for i in range(12)]
    cfg = RefreshConfig(probe_queries=12, probe_docs=len(TEXTS), probe_k=5)
    probe = StalenessProbe.build(queries, TEXTS, cfg)
    q_enc = lambda t: r.embed(moved, t)                      # noqa: E731 - the current query tower
    expected = staleness_recall(stale, fresh.embeddings(), q_enc(probe.query_texts), 5)
    assert probe.measure(q_enc, lambda t: r.embed(moved, t), stale) == expected < 1.0
    assert probe.measure(q_enc, lambda t: r.embed(_state(encoder_dir), t), stale) == 1.0


def test_an_actor_killed_from_outside_mid_refresh_resumes(tmp_path, encoder_dir, ray_session):
    """SIGKILL the actor's process as soon as its first shard is on disk (no fault injection):
    the refresher starts a fresh actor that reuses the shards already written."""
    import signal

    state = _state(encoder_dir, noise=0.2)
    clean = _refresher(tmp_path / "clean", encoder_dir, shards=15).build_now(state, 2)
    r = _refresher(tmp_path / "kill", encoder_dir, shards=15, backend="ray", max_retries=1)
    pid = r.start()
    digest = r.submit(state, 2)
    folder, deadline = tmp_path / "kill" / digest, time.time() + 120
    while not (folder.is_dir() and any(p.name.startswith("shard-") for p in folder.iterdir())):
        assert time.time() < deadline, "the actor wrote no shard"
        time.sleep(0.001)
    assert not (folder / "meta.json").exists(), "the refresh finished before the kill"
    os.kill(pid, signal.SIGKILL)
    snap = r.wait()
    r.close()
    assert snap.meta["retries"] == 1 and snap.meta["pid"] != pid
    assert 1 <= snap.meta["shards_reused"] < 15
    np.testing.assert_array_equal(snap.embeddings(), clean.embeddings())
