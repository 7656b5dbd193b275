"""`Node(kind)`: a spec field filled by a registered component, chosen by its `type:` name.

A node validates to the component's node model (its `Config` plus `type`), so errors inside a
component's config keep their full dotted path (`retriever.index.nprobe`), and a node with an
unknown `type` says which names exist and which are close.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError, core_schema

from retro.platform.registry import close_matches, registry


@dataclass(frozen=True)
class NodeOf:
    """Pydantic annotation marker: validate through registry kind `kind`."""

    kind: str

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            self.validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                _dump, info_arg=True),
        )

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict:
        # Filled by retro.platform.spec.jsonschema, which knows every registered component.
        return {"x-retro-node": self.kind}

    def validate(self, value: Any) -> BaseModel:
        if isinstance(value, BaseModel) and hasattr(value, "type"):
            value = value.model_dump(mode="json")
        if isinstance(value, dict) and value.get(PICKED):
            return narrowed(self.kind, value)
        if isinstance(value, str):
            value = {"type": value}
        if not isinstance(value, dict):
            raise PydanticCustomError(
                "component_node",
                "expected a mapping with a `type:` key (one of: {known}) or a bare type name",
                {"known": ", ".join(registry.names(self.kind))})
        name = value.get("type")
        if name is None:
            default = registry.default(self.kind)
            if default is None:
                raise _error(("type",), "missing", "choose a {kind} `type`: {known}",
                             name, kind=self.kind, known=", ".join(registry.names(self.kind)))
            name = default.name
            value = {**value, "type": name}
        known = registry.names(self.kind)
        if name not in known:
            close = close_matches(name, known)
            hint = f", did you mean {' or '.join(map(repr, close))}?" if close else ""
            message = (f"unknown {self.kind} component {name!r}{hint} "
                       f"Known: {', '.join(known) or '(none)'}")
            raise _error(("type",), "unknown_component", message.replace("{", "{{")
                         .replace("}", "}}"), name, kind=self.kind)
        return registry.get(self.kind, name).node_model().model_validate(value)


PICKED = "__picked__"
"""Marks the JSON form of a node narrowed to some fields (a stage's positive list)."""


@dataclass(frozen=True)
class NodeFieldsOf(NodeOf):
    """A node of `kind` narrowed to the fields a stage declares (a positive list)."""

    fields: tuple[str, ...] = ()

    def validate(self, value: Any) -> BaseModel:
        full = value if isinstance(value, BaseModel) else None
        if full is None:
            data = value if isinstance(value, dict) else {"type": value}
            full = narrowed(self.kind, {**data, PICKED: True}) if data.get(PICKED) \
                else super().validate(data)
        picked = {f: getattr(full, f) for f in ("type", *self.fields)
                  if f in type(full).model_fields}
        return narrowed(self.kind, {**picked, PICKED: True})


def narrowed(kind: str, value: dict[str, Any]) -> BaseModel:
    """The node of `kind` holding only the fields in `value` (already validated as part of a
    whole node); every other field is its default, and no cross-field check runs on that mix.
    It dumps to those fields only (with the PICKED mark), so keys cover nothing else."""
    data = {k: v for k, v in value.items() if k != PICKED}
    model = registry.get(kind, data["type"]).node_model()
    view = _view_class(model, tuple(sorted(k for k in data if k != "type")))
    fields = {k: _adapter(model.model_fields[k]).validate_python(v)
              for k, v in data.items() if k in model.model_fields}
    for k, info in model.model_fields.items():   # defaults a whole node would validate
        if k not in fields and info.validate_default:
            fields[k] = _adapter(info).validate_python(info.get_default(
                call_default_factory=True))
    return view.model_construct(**fields)


def _adapter(info: Any) -> TypeAdapter:
    """Validates one field's value by its annotation (its metadata markers kept: a nested
    `Node` stays a node)."""
    ann = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    return TypeAdapter(ann)


_VIEWS: dict[tuple[type, tuple[str, ...]], type] = {}


def _view_class(model: type[BaseModel], fields: tuple[str, ...]) -> type[BaseModel]:
    key = (model, fields)
    if key not in _VIEWS:
        _VIEWS[key] = type(f"{model.__name__}Picked", (model,), {"__picked_fields__": fields})
    return _VIEWS[key]


def _error(loc: tuple, error_type: str, template: str, value: Any, **ctx: Any) -> ValidationError:
    return ValidationError.from_exception_data(
        "component", [InitErrorDetails(type=PydanticCustomError(error_type, template, ctx),
                                       loc=loc, input=value)])


def _dump(value: BaseModel, info: Any) -> Any:
    picked = getattr(type(value), "__picked_fields__", None)
    if picked is None:
        return value.model_dump(mode=info.mode, exclude_none=False)
    data = value.model_dump(mode=info.mode, exclude_none=False, include={"type", *picked})
    return {**data, PICKED: True}


def Node(kind: str) -> Any:  # noqa: N802 - reads like a type in annotations
    """Annotation for a field holding a component node of registry kind `kind`."""
    return Annotated[BaseModel, NodeOf(kind)]


def NodeFields(kind: str, *fields: str) -> Any:  # noqa: N802
    """A stage param holding a node of `kind` with only `fields` (plus `type`) taken from the
    spec: the positive list of what the stage depends on."""
    return Annotated[BaseModel, NodeFieldsOf(kind, tuple(fields))]
