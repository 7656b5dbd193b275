"""Test-only plugin: a toy pipeline over an input data file, for content-keyed data tests.

read (recipe.data: a file of integers, one per line, or a folder / glob of such files)
  -> total (sum times recipe.lr);  side (recipe.offset) reads no data and depends on nothing.
"""

from __future__ import annotations

import glob
from pathlib import Path

from retro.platform.registry import StrictModel, register
from retro.platform.spec.types import DataPath
from retro.platform.stage import BaseRecipe, StageCall, StageContext, StageParams, stage
from retro.platform.store import open_memmap


def register_all() -> None:
    """Registration happens at import (decorators below)."""


@register("recipe", "toy-data")
class ToyDataRecipe(BaseRecipe):
    """Numbers read from a data input, summed; one stage reads no data (tests only)."""

    class Config(StrictModel):
        data: DataPath
        """A text file of integers (one per line), or a folder or glob of such files."""
        lr: float = 0.001
        """Multiplies the sum (a stand-in for a training hyperparameter)."""
        offset: int = 0
        """What the data-free `side` stage writes."""
        touch: bool = False
        """The read stage appends to its data file after reading it (a concurrent writer)."""

    def stages(self, spec):
        read = StageCall("read", "toy-read", reads={"data": "recipe.data",
                                                     "touch": "recipe.touch"})
        total = StageCall("total", "toy-weighted-sum", reads={"lr": "recipe.lr"},
                          inputs={"numbers": read})
        side = StageCall("side", "toy-side", reads={"offset": "recipe.offset"})
        return [read, total, side]


class ReadParams(StageParams):
    data: DataPath
    """The data input."""
    touch: bool = False
    """Append a line to the data file after reading it."""


class SumParams(StageParams):
    lr: float
    """Multiplier."""


class SideParams(StageParams):
    offset: int
    """Written as is."""


def _files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file())
    return sorted(Path(f) for f in glob.glob(path)) if any(c in path for c in "*?[") else [p]


@stage("toy-read", version="1", params=ReadParams)
def toy_read(ctx: StageContext[ReadParams]):
    """The integers of every data file, in file order."""
    files = _files(ctx.params.data)
    numbers = [int(line) for f in files for line in f.read_text().split()]
    if ctx.params.touch:
        with open(files[0], "a") as fh:
            fh.write("1000\n")
    arr = open_memmap(ctx.out_dir / "numbers.npy", "int64", (len(numbers),), mode="w+")
    arr[:] = numbers
    arr.flush()
    return {"n": len(numbers)}


@stage("toy-weighted-sum", version="1", params=SumParams, inputs={"numbers": "toy-read"})
def toy_weighted_sum(ctx: StageContext[SumParams]):
    """lr times the sum of the numbers."""
    numbers = open_memmap(ctx.inputs["numbers"].file("numbers.npy"))
    total = float(numbers.sum()) * ctx.params.lr
    (ctx.out_dir / "total.txt").write_text(repr(total))
    return {"total": total}


@stage("toy-side", version="1", params=SideParams)
def toy_side(ctx: StageContext[SideParams]):
    """`offset`, written down."""
    (ctx.out_dir / "offset.txt").write_text(str(ctx.params.offset))
    return {"offset": ctx.params.offset}
