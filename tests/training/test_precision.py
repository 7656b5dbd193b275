"""Compute precision: `auto` resolves from the hardware (simulated here), bf16 training on CPU
is autocast (fp32 master weights), deterministic, and close to fp32."""

from __future__ import annotations

import logging

import pytest
import torch

from retro.components import precision as P
from retro.components.training.launcher import launch
from tests.training.helpers import job, rows_of, wiki_rows

# /proc/cpuinfo excerpts: a Sapphire Rapids (AMX), a Zen 4 (AVX512-BF16 only), a Skylake (none)
AMX_CPU = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ZEN4_CPU = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
OLD_CPU = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"


def cpu_probe(cpuinfo: str):
    """A probe reading a simulated /proc/cpuinfo (the CUDA side answers no)."""
    return lambda kind: kind == "cpu" and bool(P.cpu_bf16_flags(cpuinfo))


def test_cpu_flags_are_read_from_cpuinfo():
    assert P.cpu_bf16_flags(AMX_CPU) == ["amx_bf16", "avx512_bf16"]
    assert P.cpu_bf16_flags(ZEN4_CPU) == ["avx512_bf16"]
    assert P.cpu_bf16_flags(OLD_CPU) == []
    # a flag name inside another line (model name) is not a flag
    assert P.cpu_bf16_flags("model name\t: amx_bf16 edition\nflags\t: sse2\n") == []


@pytest.mark.parametrize("cpuinfo, requested, expected", [
    (AMX_CPU, "auto", "bf16"), (ZEN4_CPU, "auto", "bf16"), (OLD_CPU, "auto", "fp32"),
    (AMX_CPU, "fp32", "fp32"), (OLD_CPU, "fp32", "fp32"),
    (AMX_CPU, "bf16", "bf16"), (OLD_CPU, "bf16", "bf16"),   # forced: bf16 even when slow
])
def test_resolution_on_simulated_cpus(cpuinfo, requested, expected):
    assert P.resolve_precision(requested, "cpu", probe=cpu_probe(cpuinfo)) == expected


@pytest.mark.parametrize("capability, expected", [((8, 0), "bf16"), ((9, 0), "bf16"),
                                                  ((7, 5), "fp32"), ((7, 0), "fp32")])
def test_auto_on_cuda_needs_compute_capability_8(monkeypatch, capability, expected):
    monkeypatch.setattr(P, "cuda_capability", lambda: capability)
    assert P.resolve_precision("auto", torch.device("cuda", 0)) == expected


def test_forced_bf16_without_fast_hardware_warns_in_the_log(caplog):
    log = logging.getLogger("test.stage")
    with caplog.at_level(logging.WARNING, logger="test.stage"):
        assert P.resolve_precision("bf16", "cpu", probe=cpu_probe(OLD_CPU), log=log) == "bf16"
    assert any("no fast bf16" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="test.stage"):
        P.resolve_precision("bf16", "cpu", probe=cpu_probe(AMX_CPU), log=log)
        P.resolve_precision("auto", "cpu", probe=cpu_probe(OLD_CPU), log=log)
    assert not caplog.records


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        P.resolve_precision("fp16", "cpu", probe=cpu_probe(AMX_CPU))


def test_autocast_runs_cpu_matmuls_in_bf16_and_leaves_weights_fp32():
    lin = torch.nn.Linear(8, 8)
    with P.autocast("bf16", "cpu"):
        y = lin(torch.randn(2, 8))
    assert y.dtype == torch.bfloat16 and lin.weight.dtype == torch.float32
    with P.autocast("fp32", "cpu"):
        assert lin(torch.randn(2, 8)).dtype == torch.float32


def test_plan_text_says_how_auto_resolves_here():
    assert P.plan_text("auto", cpu_probe(AMX_CPU)) == "auto→bf16 (cpu here)"
    assert P.plan_text("auto", cpu_probe(OLD_CPU)) == "auto→fp32 (cpu here)"
    assert P.plan_text("fp32") == "fp32"
    assert P.precision_info({"pretrain": {"precision": "bf16"}}, "pretrain") == \
        {"precision": "bf16"}
    assert P.precision_info({"retriever": {"type": "bm25"}}, "retriever", "embedder") == {}


# ------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def wiki(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("shared data missing")
    return wiki_rows(SHARED_DATA, tmp_path_factory.mktemp("wiki"), n_passages=600)


def _train(wiki, out, **run):
    j = job(out, *wiki, steps=4, micro_batch=8, **run)
    summary = launch(j, num_workers=1, storage=out / "work", use_ray=False)
    rows = rows_of(j.metrics_file)
    return summary, [r for r in rows if r["kind"] in ("train", "eval")], rows


def _losses(rows):
    return [(r["kind"], r.get("loss", r.get("val_loss"))) for r in rows]


def test_bf16_training_on_cpu_is_deterministic_and_close_to_fp32(wiki, tmp_path):
    s1, a, rows = _train(wiki, tmp_path / "a", precision="bf16")
    _, b, _ = _train(wiki, tmp_path / "b", precision="bf16")
    s32, c, _ = _train(wiki, tmp_path / "c", precision="fp32")
    assert _losses(a) == _losses(b)                        # two bf16 runs: identical
    assert [r["grad_norm"] for r in a if r["kind"] == "train"] == \
        [r["grad_norm"] for r in b if r["kind"] == "train"]
    assert s1["precision"] == "bf16" and s32["precision"] == "fp32"
    assert {r["kind"]: r for r in rows}["precision"]["precision"] == "bf16"
    # bf16 really ran (fp32 differs) yet stays within 2% of fp32 after a few steps
    assert _losses(a) != _losses(c)
    for (_, x), (_, y) in zip(_losses(a), _losses(c)):
        assert x == pytest.approx(y, rel=0.02)


def test_auto_without_fast_bf16_is_fp32_and_forced_bf16_warns(wiki, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "hardware_probe", lambda kind: False)   # a CPU without bf16
    s, auto, rows = _train(wiki, tmp_path / "auto", precision="auto")
    _, fp32, _ = _train(wiki, tmp_path / "fp32", precision="fp32")
    assert s["precision"] == "fp32" and _losses(auto) == _losses(fp32)
    _, _, rows = _train(wiki, tmp_path / "bf16", precision="bf16")
    row = next(r for r in rows if r["kind"] == "precision")
    assert row["precision"] == "bf16" and "no fast bf16" in row["warning"]


def test_the_stage_log_and_manifest_get_the_workers_precision(caplog):
    """A training stage turns the worker's `precision` row into log lines and summary keys."""
    from types import SimpleNamespace

    from retro.components.training.stages import _forward

    ctx = SimpleNamespace(summary={}, log=logging.getLogger("test.stage.fwd"))
    row = {"kind": "precision", "requested": "bf16", "precision": "bf16",
           "hardware": "cpu (no amx_bf16/avx512_bf16)", "warning": "precision: bf16 ... slow"}
    with caplog.at_level(logging.INFO, logger="test.stage.fwd"):
        _forward(ctx, 10, {}, row)
    assert ctx.summary == {"precision": "bf16", "precision_requested": "bf16"}
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.WARNING]


# ------------------------------------------------------------------------------ embedding
def test_embedder_bf16_is_close_to_fp32_and_auto_follows_the_hardware(monkeypatch):
    import numpy as np

    from retro.components.retrieval.embedders import HFMeanPoolEmbedder

    texts = ["Astatine is a radioactive chemical element with symbol At.",
             "The bulk properties of astatine are not known with certainty.",
             "Deadpool 2 was released in May 2018."]
    emb = {p: HFMeanPoolEmbedder(HFMeanPoolEmbedder.Config(precision=p, batch_size=2))
           for p in ("fp32", "bf16")}
    out = {p: e.embed(texts) for p, e in emb.items()}
    assert emb["bf16"].precision == "bf16"
    assert emb["bf16"]._model.dtype == torch.float32          # the loaded weights stay fp32
    cos = np.sum(out["bf16"] * out["fp32"], axis=1)            # both L2-normalised
    assert (cos > 0.995).all() and not np.array_equal(out["bf16"], out["fp32"]), cos
    monkeypatch.setattr(P, "hardware_probe", lambda kind: False)
    auto = HFMeanPoolEmbedder(HFMeanPoolEmbedder.Config(precision="auto", batch_size=2))
    assert np.array_equal(auto.embed(texts), out["fp32"]) and auto.precision == "fp32"
