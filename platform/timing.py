"""Where a stage's time goes: named wall-clock accumulators (model forward, search, I/O, ...).

`StageContext.timer(name)` adds to the stage's own `Timings`; work done elsewhere (shards in
Ray tasks, Ray Train workers) keeps a `Timings` of its own, returns `as_dict()` with its result,
and the stage adds it with `ctx.add_times`. The manifest's summary holds the totals under
`time_s` ({name: seconds}); `retro show run` prints them.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, Mapping


class Timings:
    """Seconds per name, accumulated; picklable (a plain dict inside)."""

    def __init__(self, seconds: dict[str, float] | None = None) -> None:
        """`seconds`: a dict to accumulate into, in place (e.g. a manifest summary's)."""
        self.seconds: dict[str, float] = {} if seconds is None else seconds

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """`with timings("forward"): ...` adds the block's wall time to `name`."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add({name: time.perf_counter() - t0})

    def add(self, seconds: Mapping[str, float] | None) -> "Timings":
        """Add another accumulator's `as_dict()` (or any name -> seconds mapping)."""
        for name, s in (seconds or {}).items():
            self.seconds[name] = self.seconds.get(name, 0.0) + float(s)
        return self

    def as_dict(self) -> dict[str, float]:
        return {name: round(s, 3) for name, s in self.seconds.items()}


def merge(*parts: Mapping[str, float] | None) -> dict[str, float]:
    """The sum of several `as_dict()`s (e.g. every shard's)."""
    total = Timings()
    for part in parts:
        total.add(part)
    return total.as_dict()
