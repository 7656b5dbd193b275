"""Helpers every retrieval stage uses: rebuilding components from params, shards, meta files.

Sharding rule: shard boundaries are multiples of a *window* of items, and every batch a shard
computes lies inside one window. A batch is then the same set of items whatever the number of
shards, so embeddings and search results are bit-identical for 1 or N shards.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from retro.platform.store import write_json_atomic
from retro.platform.registry import registry

META = "meta.json"


def build_component(kind: str, node: Any) -> Any:
    """`registry.build(kind, node)`: a node model or its JSON form -> the component."""

    return registry.build(kind, node)


def shard_ranges(n: int, n_shards: int, window: int = 1) -> list[tuple[int, int]]:
    """Split `range(n)` into at most `n_shards` contiguous ranges aligned to `window`."""
    n_windows = max(1, math.ceil(n / window))
    n_shards = max(1, min(n_shards, n_windows))
    out = []
    for i in range(n_shards):
        a = round(i * n_windows / n_shards) * window
        b = min(n, round((i + 1) * n_windows / n_shards) * window)
        if a < b:
            out.append((a, b))
    return out


def windows(start: int, stop: int, window: int) -> list[tuple[int, int]]:
    """Window-aligned sub-ranges of `[start, stop)` (start is assumed aligned)."""
    return [(a, min(a + window, stop)) for a in range(start, stop, window)]


def shard_count(ctx: Any, n_items: int, max_items_per_shard: int) -> int:
    """Enough shards to keep every worker busy and each shard's memory bounded."""
    return max(1, min(n_items, max(ctx.resources.num_workers,
                                   math.ceil(n_items / max_items_per_shard))))


def run_shards(ctx: Any, fn: Callable[[Any], Any], items: Sequence[Any], sizes: Sequence[int],
               desc: str) -> list:
    """`ctx.parallel_map(fn, items)`, the stage log counting `sizes[i]` as item i finishes.

    Returns:
        Results in item order.
    """
    with ctx.progress(sum(sizes), desc) as bar:
        return ctx.parallel_map(fn, list(items), on_result=lambda i, _: bar.update(sizes[i]))


def done_marker(work: Path, name: str) -> Path:
    """Marker file of a finished shard: a re-run after a crash skips that shard."""
    d = work / "done"
    d.mkdir(parents=True, exist_ok=True)
    return d / name


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The `meta.json` an artifact writes for its readers."""
    return json.loads((Path(path) / META).read_text())


def write_meta(out_dir: Path, **meta: Any) -> None:
    write_json_atomic(out_dir / META, meta)


def artifact_path(x: Any) -> Path:
    """An Artifact, or a plain path, as a Path."""
    return Path(getattr(x, "path", x))
