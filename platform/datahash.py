"""Input data in stage keys by content: sha256 digests of files, folders and globs, cached.

A stage's key must say what its artifact was computed from, and the same bytes must give the
same key wherever they are mounted. So every data input a stage reads from outside the store
(a `DataPath` field, or package data a config declares) enters the key as a content digest; the
stage still receives the path.

    file     sha256 of its bytes (what `sha256sum` prints)
    folder   sha256 over sorted `relative/name\\0<file sha256>\\n` lines: all its files, or the
             files the config narrows it to (`data_files`)
    glob     the same over the matched files, names relative to the glob's fixed prefix
    package  {distribution, version, sha256 of the files used}

Hashing is cached DVC-style in `<store>/.cache/data-hashes.json`: real path -> (size, mtime_ns,
inode, sha256). A file whose stat is unchanged is not read again, so planning a spec whose data
did not change reads no data. A plan also records each file's stat; `check_unchanged` compares
them after the stage ran, so a file rewritten meanwhile fails the stage instead of committing
an artifact of mixed or newer data under the old key.
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from retro.platform.errors import InputDataError
from retro.platform.spec.types import DataInput, data_inputs
from retro.platform.store import write_json_atomic
from importlib import metadata

CACHE_FILE = Path(".cache") / "data-hashes.json"
MAGIC = "*?["

Stat = tuple[str, int, int, int]  # (real path, size, mtime_ns, inode)


def is_glob(value: str) -> bool:
    return any(ch in value for ch in MAGIC)


@dataclass
class DataDigest:
    """What one data input hashed to, for one spec location."""

    location: str                 # dotted spec path: corpus.paths.0
    path: str | None              # as the spec gives it (package data: the install path)
    kind: str                     # file | folder | glob | package | missing
    sha256: str | None            # None: missing (nothing to hash)
    cached: bool                  # every file's hash came from the cache: no data was read
    package: dict[str, Any] | None = None    # {name, version} of package data
    param: str = ""               # where it sits in the stage's params (set per stage)
    files: list[Stat] = field(default_factory=list, repr=False)  # stat of each file hashed
    root: str = ""                # absolute folder / glob / file path, for the re-check
    patterns: tuple[str, ...] = ()

    def key_value(self) -> Any:
        """What replaces the path in the key."""
        if self.sha256 is None:
            what = f"package {self.package['name']}" if self.package else self.path
            return f"<missing data: {what}>"
        if self.package:
            return {**self.package, "sha256": self.sha256}
        return f"sha256:{self.sha256}"

    def record(self) -> dict[str, Any]:
        """What a manifest keeps (`retro plan --explain` compares it)."""
        out = {"path": self.path, "kind": self.kind, "sha256": self.sha256, "param": self.param}
        return {**out, "package": self.package} if self.package else out

    def to_json(self) -> dict[str, Any]:
        return {**self.record(), "cached": self.cached}


class DataHasher:
    """Digests data inputs through the stat cache of one store.

    `cache_dir` None hashes without a cache; `write=False` reads the cache but never writes it
    (`retro validate` writes nothing).
    """

    def __init__(self, cache_dir: str | Path | None, write: bool = True):
        self.cache_file = Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
        self.write = write and self.cache_file is not None
        self._cache = _load(self.cache_file)
        self._new: dict[str, dict[str, Any]] = {}
        self._memo: dict[tuple, DataDigest] = {}

    def digest(self, item: DataInput) -> DataDigest:
        """The digest of one data input (memoised for this hasher)."""
        memo_key = (item.path, item.files, item.package)
        if memo_key not in self._memo:
            self._memo[memo_key] = self._digest(item)
        return dataclasses.replace(self._memo[memo_key], location=item.location)

    def _digest(self, item: DataInput) -> DataDigest:
        package = _package_info(item.package) if item.package else None
        value = item.path
        missing = DataDigest(item.location, value, "missing", None, True, package)
        if value is None:
            return missing
        listing = list_files(value, item.files)
        if listing is None:
            return missing
        kind, root, files = listing
        if kind == "file":  # narrowing patterns apply to folders only
            sha, cached, st = self._file(files[0][1])
            return DataDigest(item.location, value, "package" if package else kind, sha, cached,
                              package, files=[st], root=root)
        h, all_cached, stats = hashlib.sha256(), True, []
        for rel, real in files:
            if real is None:  # a file the config names is absent: keyed as such
                h.update(f"{rel}\0<missing>\n".encode())
                continue
            sha, cached, st = self._file(real)
            h.update(f"{rel}\0{sha}\n".encode())
            all_cached &= cached
            stats.append(st)
        return DataDigest(item.location, value, "package" if package else kind, h.hexdigest(),
                          all_cached, package, files=stats, root=root,
                          patterns=tuple(item.files))

    def _file(self, real: str) -> tuple[str, bool, Stat]:
        st = os.stat(real)
        sig = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
        stat = (real, st.st_size, st.st_mtime_ns, st.st_ino)
        fresh = self._new.get(real)  # hashed earlier in this plan: read now, not cached
        if fresh and all(fresh.get(k) == v for k, v in sig.items()):
            return fresh["sha256"], False, stat
        entry = self._cache.get(real)
        if entry and all(entry.get(k) == v for k, v in sig.items()):
            return entry["sha256"], True, stat
        with open(real, "rb") as fh:
            sha = hashlib.file_digest(fh, "sha256").hexdigest()
        self._new[real] = {**sig, "sha256": sha}
        return sha, False, stat

    def save(self) -> None:
        """Merge new hashes into the cache file under a lock (two planners may save at once).
        A store that cannot be written (read-only mount) just stays uncached."""
        if not self.write or not self._new:
            return
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.cache_file.with_suffix(".lock"), "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                merged = {**_load(self.cache_file), **self._new}
                write_json_atomic(self.cache_file, merged)
        except OSError:
            return
        self._cache.update(self._new)
        self._new = {}


def list_files(value: str, patterns: Iterable[str] = ()
               ) -> tuple[str, str, list[tuple[str, str | None]]] | None:
    """(kind, absolute root, sorted [(relative name, real path)]) of what `value` names, or
    None when it does not exist / matches nothing. `patterns` narrow a folder; a plain name
    among them that is absent is listed with real path None."""
    patterns = tuple(patterns)
    if is_glob(value):
        matches = sorted(glob.glob(value, recursive=True))
        if not matches:
            return None
        base = _glob_base(value)
        files = []
        for m in matches:
            if os.path.isdir(m):
                files += [(os.path.relpath(f, base), real) for f, real in _walk(m)]
            elif os.path.isfile(m):
                files.append((os.path.relpath(m, base), os.path.realpath(m)))
        return "glob", os.path.abspath(value), sorted(set(files))
    p = Path(value)
    if p.is_file():
        return "file", str(p.absolute()), [(p.name, os.path.realpath(p))]
    if not p.is_dir():
        return None
    if patterns:
        files = sorted({(str(f.relative_to(p)), os.path.realpath(f))
                        for pat in patterns for f in p.glob(pat) if f.is_file()})
        # A named file that is absent still counts (as missing) so it cannot go unnoticed.
        absent = [pat for pat in patterns if not is_glob(pat) and not (p / pat).is_file()]
        files = sorted(files + [(pat, None) for pat in absent])
    else:
        files = sorted((os.path.relpath(f, p), real) for f, real in _walk(str(p)))
    return "folder", str(p.absolute()), files


def _walk(root: str) -> list[tuple[str, str]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            f = os.path.join(dirpath, name)
            if os.path.isfile(f):
                out.append((f, os.path.realpath(f)))
    return out


def _glob_base(pattern: str) -> str:
    """The folder part of a glob before its first wildcard: match names are relative to it."""
    fixed = []
    for part in Path(pattern).parts[:-1]:
        if is_glob(part):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


@lru_cache(maxsize=None)
def _package_info(name: str) -> dict[str, Any]:
    """{name, version} of an installed distribution (or the one providing import `name`)."""

    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        dists = metadata.packages_distributions().get(name, [])
        if not dists:
            return {"name": name, "version": None}
        dist = metadata.distribution(dists[0])
    return {"name": dist.metadata["Name"], "version": dist.version}


def _load(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ------------------------------------------------------------------------------ key params
class DataKeys:
    """The data inputs of one validated spec, and the params a stage's key hashes."""

    def __init__(self, spec: Any, hasher: DataHasher):
        self.inputs = list(data_inputs(spec))
        self.hasher = hasher

    def key_params(self, reads: dict[str, str], params: dict[str, Any],
                   consts: dict[str, Any] | None = None
                   ) -> tuple[dict[str, Any], dict[str, DataDigest]]:
        """`params` with every data input replaced by its digest (for the key only), and the
        digests used, by spec location.

        `reads` maps param name -> dotted spec path, as in `StageCall.reads`. A data input
        inside a read value is found by its spec location; a recipe constant that repeats a
        data path of the spec (e.g. ra-dit's excluded question sets) by its value.
        """
        consts = consts or {}
        keyed = json.loads(json.dumps(params, default=str))
        used: dict[str, DataDigest] = {}
        for name, read in reads.items():
            if name in consts or name not in keyed:
                continue
            spec_path = getattr(read, "path", read)  # a dotted path, or a Pick of one
            for item in self.inputs:
                rel = _relative(item.location, spec_path)
                # The value must still be there: a pick or the params model may drop a field.
                if rel is None or _get(keyed, [name, *rel]) != item.value:
                    continue
                digest = self.hasher.digest(item)
                _set(keyed, [name, *rel], digest.key_value())
                used[item.location] = dataclasses.replace(digest, param=".".join([name, *rel]))
        by_value: dict[str, list[DataInput]] = {}
        for item in self.inputs:
            if item.path is not None and item.package is None:
                by_value.setdefault(item.path, []).append(item)
        for name in consts:
            if name in keyed:
                keyed[name] = self._consts(keyed[name], [name], by_value, used)
        return keyed, used

    def _consts(self, value: Any, where: list[str], by_value: dict[str, list[DataInput]],
                used: dict[str, DataDigest]) -> Any:
        if isinstance(value, dict):
            return {k: self._consts(v, where + [k], by_value, used) for k, v in value.items()}
        if isinstance(value, list):
            return [self._consts(v, where + [str(i)], by_value, used)
                    for i, v in enumerate(value)]
        if isinstance(value, str) and value in by_value:
            digests = [self.hasher.digest(item) for item in by_value[value]]
            for d in digests:
                used[d.location] = dataclasses.replace(d, param=".".join(where))
            keys = sorted({json.dumps(d.key_value(), sort_keys=True) for d in digests})
            return [json.loads(k) for k in keys] if len(keys) > 1 else json.loads(keys[0])
        return value


def _relative(location: str, spec_path: str) -> list[str] | None:
    """`location` as parts below `spec_path`, or None if it is not under it."""
    if not spec_path:
        return location.split(".")
    if location == spec_path:
        return []
    if location.startswith(spec_path + "."):
        return location[len(spec_path) + 1:].split(".")
    return None


def _get(tree: Any, parts: list[str]) -> Any:
    """The value at `parts`, or a sentinel when that location is absent."""
    node = tree
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _ABSENT
    return node


def _set(tree: Any, parts: list[str], value: Any) -> None:
    parent = _get(tree, parts[:-1])
    parent[int(parts[-1]) if isinstance(parent, list) else parts[-1]] = value


_ABSENT = object()


# ------------------------------------------------------------------------------ re-check
def changed_files(digest: DataDigest) -> list[str]:
    """What differs now from the stat recorded when `digest` was hashed (empty: nothing)."""
    if digest.sha256 is None:
        return []
    if is_glob(digest.root) or os.path.isdir(digest.root):  # files may appear or go
        listing = list_files(digest.root, digest.patterns)
        now = {real for _, real in listing[2] if real} if listing else set()
        was = {st[0] for st in digest.files}
        if now != was:
            added, gone = sorted(now - was), sorted(was - now)
            return [f"{p} appeared" for p in added] + [f"{p} disappeared" for p in gone]
    out = []
    for real, size, mtime_ns, ino in digest.files:
        try:
            st = os.stat(real)
        except OSError:
            out.append(f"{real} disappeared")
            continue
        if (st.st_size, st.st_mtime_ns, st.st_ino) != (size, mtime_ns, ino):
            out.append(f"{real} was modified (size {size} -> {st.st_size})"
                       if st.st_size != size else f"{real} was modified")
    return out


def check_unchanged(stage: str, digests: dict[str, DataDigest]) -> None:
    """Raise if any data input changed since it was hashed for this stage's key.

    Raises:
        InputDataError: naming the spec location and the file, so nothing is committed.
    """
    problems = [f"{loc}: {what}" for loc, d in digests.items() for what in changed_files(d)]
    if problems:
        raise InputDataError(
            f"stage {stage!r}: its input data changed while it ran (since `retro run` hashed "
            "it for the key): " + "; ".join(problems[:5])
            + ("; ..." if len(problems) > 5 else "")
            + ". Nothing was committed; run again to key the new content.")
