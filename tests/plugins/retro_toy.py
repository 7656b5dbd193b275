"""Test-only plugin: a tiny numeric pipeline that exercises the platform end to end.

source (recipe.n) -> scale (recipe.factor, sharded with parallel_map) -> total (recipe.offset)
Each stage may sleep (recipe.sleep) so tests can kill a run mid-stage.
"""

from __future__ import annotations

import time
from typing import Optional

from pydantic import Field

from retro.platform.registry import StrictModel, register
from retro.platform.stage import StageCall
from retro.platform.store import open_memmap


def register_all() -> None:
    """Registration happens at import (decorators below)."""


@register("recipe", "toy")
class ToyRecipe:
    """Three chained numeric stages (tests only)."""

    class Config(StrictModel):
        n: int = Field(8, ge=1)
        """How many numbers the source writes."""
        factor: int = 2
        """Multiplier applied by the scale stage."""
        offset: int = 0
        """Added by the total stage only."""
        sleep: float = 0.0
        """Seconds each stage sleeps (to kill runs mid-stage in tests)."""
        fail: Optional[str] = None
        """Name of a stage that raises."""
        label: str = ""
        """Free text the source stage reads (tests keep secrets out of run files with it)."""

    def __init__(self, config):
        self.config = config

    def check(self, spec):
        from retro.platform.errors import SpecIssue

        if self.config.fail not in (None, "source", "scale", "total"):
            return [SpecIssue("recipe.fail", "not a toy stage", value=self.config.fail,
                              has_value=True, hint="source, scale or total")]
        return []

    def stages(self, spec):
        common = {"sleep": "recipe.sleep", "fail": "recipe.fail"}
        return [
            StageCall("source", "toy-source", reads={"n": "recipe.n", "label": "recipe.label",
                                                         **common}),
            StageCall("scale", "toy-scale", reads={"factor": "recipe.factor", **common},
                      inputs={"numbers": "source"}),
            StageCall("total", "toy-total", reads={"offset": "recipe.offset", **common},
                      inputs={"numbers": "scale"}),
        ]


def _maybe(ctx, name):
    if ctx.params.get("sleep"):
        time.sleep(ctx.params["sleep"])
    if ctx.params.get("fail") == name:
        raise RuntimeError(f"toy stage {name} failed on purpose")


@register("stage", "toy-source")
def toy_source(ctx):
    _maybe(ctx, "source")
    arr = open_memmap(ctx.out_dir / "numbers.npy", "int64", (ctx.params["n"],), mode="w+")
    arr[:] = range(ctx.params["n"])
    arr.flush()
    return {"n": ctx.params["n"]}


def _scale_shard(args):
    values, factor = args
    return [v * factor for v in values]


@register("stage", "toy-scale")
def toy_scale(ctx):
    _maybe(ctx, "scale")
    import numpy as np

    numbers = open_memmap(ctx.inputs["numbers"].file("numbers.npy"))
    shards = [(numbers[i::2].tolist(), ctx.params["factor"]) for i in range(2)]
    parts = ctx.parallel_map(_scale_shard, shards)
    out = np.empty(len(numbers), dtype="int64")
    out[0::2], out[1::2] = parts[0], parts[1]
    np.save(ctx.out_dir / "numbers.npy", out)
    for step, v in enumerate(out[:3]):
        ctx.log_metrics(step=step, value=float(v))
    return {"n": len(out)}


@register("stage", "toy-total")
def toy_total(ctx):
    _maybe(ctx, "total")
    numbers = open_memmap(ctx.inputs["numbers"].file("numbers.npy"))
    total = int(numbers.sum()) + ctx.params["offset"]
    (ctx.out_dir / "total.txt").write_text(str(total))
    return {"total": total}


toy_total.estimate = lambda params: {"offset": params["offset"]}
