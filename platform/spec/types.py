"""Field types components use in their configs."""

from __future__ import annotations

import glob
import typing
from pathlib import Path
from typing import Annotated, Any, Iterator

from pydantic import BaseModel


class _DataPathMarker:
    """Marks a config field as an input data path (file, directory or glob)."""


DataPath = Annotated[str, _DataPathMarker()]
"""A path to input data. Relative paths are relative to the working directory. `retro plan`
reports missing ones, `retro run` refuses to start without them, and resolved.yaml records their
content hashes."""


def data_paths(model: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Every (dotted path, value) of a DataPath field inside a validated config tree."""
    if isinstance(model, BaseModel):
        for name, f in type(model).model_fields.items():
            value = getattr(model, name)
            path = f"{prefix}{name}"
            if _is_data_path(f.annotation, f.metadata) and value is not None:
                for i, v in enumerate(value if isinstance(value, (list, tuple)) else [value]):
                    yield (path if not isinstance(value, (list, tuple)) else f"{path}.{i}", v)
            else:
                yield from data_paths(value, path + ".")
    elif isinstance(model, (list, tuple)):
        for i, v in enumerate(model):
            yield from data_paths(v, f"{prefix}{i}.")
    elif isinstance(model, dict):
        for k, v in model.items():
            yield from data_paths(v, f"{prefix}{k}.")


def _is_data_path(ann: Any, metadata: list) -> bool:
    if any(isinstance(m, _DataPathMarker) for m in metadata):
        return True
    if typing.get_origin(ann) is Annotated:
        return any(isinstance(m, _DataPathMarker) for m in typing.get_args(ann)[1:])
    return any(_is_data_path(a, []) for a in typing.get_args(ann))


def path_exists(value: str) -> bool:
    """True if the path exists, or the glob matches at least one file."""
    if any(ch in value for ch in "*?["):
        return bool(glob.glob(value, recursive=True))
    return Path(value).exists()
