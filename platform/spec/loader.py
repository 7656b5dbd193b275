"""Reading spec files: YAML with line numbers, `extends:`, `${env:VAR,default}`, `-o` overrides.

The output is a plain dict plus a `SourceMap` from dotted paths to (file, line), so that every
later validation error can point at the line that caused it. YAML goes through the safe loader
only: a spec can never construct Python objects.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from retro.platform.errors import SpecError, SpecIssue

Path_ = tuple  # a dotted path as a tuple of keys (str) and list indexes (int)


@dataclass
class SourceMap:
    """Where each value of the merged spec came from."""

    locations: dict[Path_, tuple[str, int]] = field(default_factory=dict)
    root_file: str | None = None

    def locate(self, path: Path_) -> tuple[str | None, int | None]:
        """File and line of `path`, or of its closest ancestor that has one."""
        for n in range(len(path), -1, -1):
            if tuple(path[:n]) in self.locations:
                return self.locations[tuple(path[:n])]
        return self.root_file, None

    def drop(self, prefix: Path_) -> None:
        for key in [k for k in self.locations if k[: len(prefix)] == prefix]:
            del self.locations[key]


def dotted(path: Path_) -> str:
    return ".".join(str(p) for p in path)


# ---------------------------------------------------------------------------- YAML with lines

_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


def parse_yaml(text: str, filename: str) -> tuple[Any, dict[Path_, tuple[str, int]]]:
    """Safe-load `text`, returning the data and the 1-based line of every path."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError([SpecIssue("", f"YAML syntax error: {problem}", filename, line,
                                   hint="check indentation, colons and quotes on that line")])
    finally:
        loader.dispose()
    lines: dict[Path_, tuple[str, int]] = {}
    issues: list[SpecIssue] = []

    def build(node: yaml.Node, path: Path_) -> Any:
        lines[path] = (filename, node.start_mark.line + 1)
        if not isinstance(node, yaml.ScalarNode) and node.tag not in _PLAIN_TAGS:
            raise SpecError([SpecIssue(dotted(path), f"unsupported YAML tag {node.tag!r}",
                                       filename, node.start_mark.line + 1,
                                       hint="specs are plain data: remove the tag")])
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = loader.construct_object(key_node, deep=True)
                if key in out:
                    issues.append(SpecIssue(dotted(path + (key,)), "duplicate key", filename,
                                            key_node.start_mark.line + 1,
                                            hint="keep one of the two entries"))
                out[key] = build(value_node, path + (key,))
                lines[path + (key,)] = (filename, key_node.start_mark.line + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [build(v, path + (i,)) for i, v in enumerate(node.value)]
        return loader.construct_object(node, deep=True)

    try:
        data = {} if root is None else build(root, ())
    except yaml.YAMLError as e:
        raise SpecError([SpecIssue("", f"YAML error: {e}", filename)])
    if issues:
        raise SpecError(issues)
    return data, lines


# ---------------------------------------------------------------------------- extends + merge

def load_file(path: str | Path, _stack: tuple[Path, ...] = ()) -> tuple[dict, SourceMap]:
    """Load `path` and everything it `extends`, child values overriding the base's."""
    path = Path(path).resolve()
    shown = _display(path)
    if path in _stack:
        chain = " -> ".join(_display(p) for p in (*_stack, path))
        raise SpecError([SpecIssue("extends", f"cyclic extends: {chain}", _display(_stack[-1]),
                                   hint="remove one of the extends links")])
    if not path.is_file():
        where = _display(_stack[-1]) if _stack else None
        raise SpecError([SpecIssue("extends" if _stack else "", f"spec file not found: {shown}",
                                   where, hint="check the path (extends paths are relative to "
                                   "the file that names them)")])
    data, lines = parse_yaml(path.read_text(encoding="utf-8"), shown)
    if not isinstance(data, dict):
        raise SpecError([SpecIssue("", "a spec must be a YAML mapping (key: value pairs)",
                                   shown, 1, repr(type(data).__name__), True)])
    smap = SourceMap(dict(lines), shown)
    bases = data.pop("extends", None)
    if bases is None:
        return data, smap
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise SpecError([SpecIssue("extends", "extends must be a file path or a list of paths",
                                   *lines.get(("extends",), (shown, None)), bases, True)])
    merged: dict = {}
    merged_map = SourceMap(root_file=shown)
    for base in bases:
        base_data, base_map = load_file(path.parent / base, (*_stack, path))
        merged = deep_merge(merged, base_data)
        merged_map.locations.update(base_map.locations)
    smap.locations.pop(("extends",), None)
    for key in data:  # a child's value replaces the base's wholesale below a list/scalar
        if not isinstance(data[key], dict):
            merged_map.drop((key,))
    merged_map.locations.update(smap.locations)
    return deep_merge(merged, data), merged_map


def deep_merge(base: dict, child: dict) -> dict:
    """Mappings merge recursively; anything else in `child` replaces the base value."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------- ${env:...}

_ENV = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?:,([^}]*))?\}")


def interpolate(data: Any, smap: SourceMap, path: Path_ = ()) -> tuple[Any, list[SpecIssue]]:
    """Replace `${env:VAR,default}` in every string; unset variables without default are errors."""
    issues: list[SpecIssue] = []

    def walk(value: Any, p: Path_) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, p + (k,)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, p + (i,)) for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value

        def sub(m: re.Match) -> str:
            var, default = m.group(1), m.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default.strip()
            issues.append(SpecIssue(dotted(p), f"environment variable {var} is not set",
                                    *smap.locate(p), value, True,
                                    hint=f"export {var}=... or write ${{env:{var},default}}"))
            return m.group(0)

        return _ENV.sub(sub, value)

    return walk(data, path), issues


# ---------------------------------------------------------------------------- -o overrides

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$|^\d+$")


def parse_override(text: str) -> tuple[Path_, Any]:
    """`a.b.c=value` -> (("a","b","c"), typed value). The value is parsed as YAML."""
    if "=" not in text:
        raise SpecError([SpecIssue("", f"override {text!r} is not of the form a.b.c=value",
                                   "<-o override>", hint="for example: -o model.freeze=frozen")])
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or not all(_KEY.match(p) for p in parts):
        raise SpecError([SpecIssue(key, f"override key {key!r} is not a dotted path",
                                   "<-o override>", hint="keys are names joined by dots")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise SpecError([SpecIssue(key, f"override value {raw!r} is not valid YAML: {e}",
                                   "<-o override>", hint="quote strings that contain : or #")])
    return tuple(int(p) if p.isdigit() else p for p in parts), value


def apply_override(data: dict, path: Path_, value: Any, origin: str = "<-o override>",
                   smap: SourceMap | None = None) -> None:
    """Set `path` in `data` (creating mappings as needed); list items by integer index."""
    node: Any = data
    for i, part in enumerate(path[:-1]):
        nxt = _child(node, part, path[: i + 1], origin)
        if nxt is None:  # absent: create it; an absent list gets its first item only
            nxt = _new_container(path, i + 1, origin)
            node[part] = nxt
        node = nxt
    last = path[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            raise SpecError([SpecIssue(dotted(path), f"no list item {last} to override",
                                       origin, hint=f"the list has {len(node)} items")])
    elif not isinstance(node, dict):
        raise SpecError([SpecIssue(dotted(path), "cannot set a key inside a non-mapping value",
                                   origin, node, True)])
    node[last] = value
    if smap is not None:
        smap.drop(path)
        smap.locations[path] = (origin, 0)


def _new_container(path: Path_, i: int, origin: str) -> dict | list:
    """The value to create at `path[:i]` so that `path[i]` can be set inside it."""
    if not isinstance(path[i], int):
        return {}
    if path[i] == 0:  # `-o tracking.0.mode=offline` on a spec without `tracking:`
        return [{}]
    raise SpecError([SpecIssue(dotted(path[:i]), f"not set, so it has no item {path[i]}",
                               origin, hint=f"set the whole list: -o '{dotted(path[:i])}=[...]'")])


def _child(node: Any, part: Any, path: Path_, origin: str) -> Any:
    if isinstance(node, dict):
        if isinstance(node.get(part), str):  # `recipe: toy` is shorthand for {type: toy}
            node[part] = {"type": node[part]}
        return node.get(part)
    if isinstance(node, list) and isinstance(part, int) and part < len(node):
        if isinstance(node[part], str):
            node[part] = {"type": node[part]}
        return node[part]
    raise SpecError([SpecIssue(dotted(path), "cannot descend into this value", origin, node,
                               True, hint="override a mapping key or a list index that exists")])
