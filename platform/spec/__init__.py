"""Load, validate and expand specs: file(s) -> `LoadedSpec` with one `Spec` per sweep variant."""

from __future__ import annotations

import copy
import itertools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel, ValidationError

from retro.platform.errors import SpecError, SpecIssue
from retro.platform.registry import close_matches, registry
from retro.platform.spec.loader import (SourceMap, apply_override, dotted, interpolate,
                                        load_file, parse_override)
from retro.platform.spec.model import Spec
from retro.platform.spec.node import NodeOf

__all__ = ["Spec", "LoadedSpec", "Variant", "load_spec", "validate_dict"]


@dataclass
class Variant:
    """One point of the experiment: the base spec with a sweep point applied."""

    name: str
    spec: Spec
    point: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedSpec:
    spec: Spec
    variants: list[Variant]
    raw: dict
    source: SourceMap
    path: Path | None = None

    @property
    def is_sweep(self) -> bool:
        return self.spec.sweep is not None


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> LoadedSpec:
    """Read a spec file (with its `extends` chain) and `-o` overrides, then validate it all.

    Raises:
        SpecError: every problem found, each with dotted path, file and line.
    """
    registry.load_plugins()
    raw, smap = load_file(path)
    issues: list[SpecIssue] = []
    for text in overrides:
        try:
            key, value = parse_override(text)
            apply_override(raw, key, value, origin=f"<-o {text}>", smap=smap)
        except SpecError as e:
            issues.extend(e.issues)
    raw, env_issues = interpolate(raw, smap)
    issues.extend(env_issues)
    spec = None
    try:
        spec = validate_dict(raw, smap)
    except SpecError as e:
        issues.extend(e.issues)
    if issues or spec is None:
        raise SpecError(issues)
    variants = expand_sweep(spec, raw, smap)
    for v in variants:
        issues.extend(recipe_issues(v, smap))
    if issues:
        raise SpecError(issues)
    spec = resolve_values(spec)
    for v in variants:
        v.spec = resolve_values(v.spec)
    return LoadedSpec(spec, variants, raw, smap, Path(path))


def resolve_values(spec: Spec) -> Spec:
    """The recipe's `resolve`: every value the run uses written into the spec."""
    return registry.get("recipe", spec.recipe.type).obj(spec.recipe).resolve(spec)


def validate_dict(raw: dict, smap: SourceMap | None = None, context: str = "") -> Spec:
    """Validate a merged spec dict; map every pydantic error to a located `SpecIssue`."""
    smap = smap or SourceMap()
    try:
        return Spec.model_validate(raw)
    except ValidationError as e:
        raise SpecError([_issue(err, raw, smap, context) for err in e.errors()]) from None


def expand_sweep(spec: Spec, raw: dict, smap: SourceMap) -> list[Variant]:
    """One `Variant` per sweep point (or one named `main` without a sweep)."""
    if spec.sweep is None:
        return [Variant("main", spec)]
    if spec.sweep.grid:
        keys = list(spec.sweep.grid)
        points = [dict(zip(keys, combo))
                  for combo in itertools.product(*(spec.sweep.grid[k] for k in keys))]
        named = [("-".join(_slug(k, v) for k, v in p.items()), p) for p in points]
    else:
        named = [(v.name, dict(v.set)) for v in spec.sweep.variants]
    variants, issues = [], []
    for name, point in named:
        data = copy.deepcopy(raw)
        data.pop("sweep", None)
        try:
            for key, value in point.items():
                path, _ = parse_override(f"{key}=null")
                apply_override(data, path, copy.deepcopy(value), origin=f"sweep variant {name}")
            variants.append(Variant(name, validate_dict(data, smap, f"sweep variant {name!r}: "),
                                    point))
        except SpecError as e:
            issues.extend(e.issues)
    if issues:
        raise SpecError(issues)
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise SpecError([SpecIssue("sweep", f"variant names repeat: {names}", *smap.locate(
            ("sweep",)), hint="give every variant a distinct name")])
    return variants


def _slug(key: str, value: Any) -> str:
    leaf = key.split(".")[-1]
    text = str(value).lower() if not isinstance(value, str) else value
    return f"{leaf}={text}".replace("/", "_").replace(" ", "")


def recipe_issues(variant: Variant, smap: SourceMap) -> list[SpecIssue]:
    """Cross-field checks owned by the spec's recipe (which sections it needs, ...)."""
    recipe = registry.get("recipe", variant.spec.recipe.type).obj(variant.spec.recipe)
    found = list(recipe.check(variant.spec))
    out = []
    for issue in found:
        if issue.file is None:
            path = tuple(int(p) if p.isdigit() else p for p in issue.path.split(".") if p)
            issue.file, issue.line = smap.locate(path)
        if variant.name != "main":
            issue.message = f"sweep variant {variant.name!r}: {issue.message}"
        out.append(issue)
    return out


# ------------------------------------------------------------------------------ error mapping

def _issue(err: dict, raw: dict, smap: SourceMap, context: str) -> SpecIssue:
    path = _clean_loc(err["loc"], raw, err["type"])
    file, line = smap.locate(path)
    has_value = err["type"] not in ("missing",)
    value = err.get("input")
    hint = None
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        allowed = allowed_keys(path[:-1], raw)
        msg = "unknown key"
        value, has_value = path[-1], True
        close = close_matches(path[-1], allowed)
        hint = (f"did you mean {' or '.join(map(repr, close))}? " if close else "") + \
            (f"allowed keys here: {', '.join(allowed)}" if allowed else "")
    elif err["type"] == "literal_error":
        hint = "allowed: " + err.get("ctx", {}).get("expected", "")
    elif err["type"] == "unknown_component":
        hint = "list the names with `retro components " + err["ctx"]["kind"] + "`"
    elif err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    if isinstance(value, (dict, list)) and len(repr(value)) > 80:
        value = f"{type(value).__name__} of {len(value)} items"
    return SpecIssue(dotted(path), context + msg, file, line, value, has_value, hint)


def _clean_loc(loc: tuple, raw: Any, err_type: str) -> tuple:
    """Drop the tags pydantic adds for unions/validators; keep keys that exist in the data."""
    out: list[Any] = []
    node = raw
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and part in node:
            node = node[part]
            out.append(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
            out.append(part)
        elif last and err_type in ("missing", "extra_forbidden"):
            out.append(part)
        elif isinstance(part, str) and not last and not part.isidentifier():
            continue  # e.g. 'function-plain[validate()]'
        elif isinstance(part, str) and part.isidentifier() and err_type == "missing":
            out.append(part)
            node = None
    return tuple(out)


def allowed_keys(path: tuple, raw: Any) -> list[str]:
    """Field names valid at `path` (follows component `type:` choices in the data)."""
    model: Any = Spec
    node = raw
    pending: Any = None
    for part in path:
        node = node[part] if isinstance(node, (dict, list)) and _has(node, part) else None
        ann = pending if pending is not None else _field_ann(model, part)
        pending = None
        model, pending = _resolve(ann, node)
        if model is None and pending is None:
            return []
    if model is None:
        return []
    return sorted(model.model_fields)


def _has(node: Any, part: Any) -> bool:
    return part in node if isinstance(node, dict) else isinstance(part, int) and part < len(node)


def _field_ann(model: Any, part: Any) -> Any:
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    f = model.model_fields.get(part)
    if f is None:
        return None
    return typing.Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation


def _resolve(ann: Any, node: Any) -> tuple[Any, Any]:
    """-> (model class at this level, element annotation for the next level if a container)."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        for meta in args[1:]:
            if isinstance(meta, NodeOf):
                name = node.get("type") if isinstance(node, dict) else None
                entry = registry.get(meta.kind, name) if name in registry.names(meta.kind) \
                    else registry.default(meta.kind)
                return (entry.node_model() if entry else None), None
        return _resolve(args[0], node)
    if origin in (list, tuple):
        return None, args[0] if args else None
    if origin is dict:
        return None, args[1] if len(args) == 2 else None
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        for a in args:
            if a is not type(None):
                return _resolve(a, node)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann, None
    return None, None
