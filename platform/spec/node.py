"""`Node(kind)`: a spec field filled by a registered component, chosen by its `type:` name.

A node validates to the component's node model (its `Config` plus `type`), so errors inside a
component's config keep their full dotted path (`retriever.index.nprobe`), and a node with an
unknown `type` says which names exist and which are close.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ValidationError
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


@dataclass(frozen=True)
class NodeFieldsOf(NodeOf):
    """A node of `kind` narrowed to the fields a stage declares (a positive list).

    The value validates as the whole component node, then every field not in `fields` is reset
    to its default: the stage can neither see nor depend on it, and it does not enter the key.
    """

    fields: tuple[str, ...] = ()

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            self.validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                self._dump_fields, info_arg=True))

    def validate(self, value: Any) -> BaseModel:
        full = super().validate(value)
        # A field another component of the kind lacks is simply absent here.
        return type(full).model_validate({f: getattr(full, f) for f in ("type", *self.fields)
                                          if f in type(full).model_fields})

    def _dump_fields(self, value: BaseModel, info: Any) -> Any:
        dumped = value.model_dump(mode=info.mode, exclude_none=False)
        return {k: dumped[k] for k in ("type", *self.fields) if k in dumped}


def _error(loc: tuple, error_type: str, template: str, value: Any, **ctx: Any) -> ValidationError:
    return ValidationError.from_exception_data(
        "component", [InitErrorDetails(type=PydanticCustomError(error_type, template, ctx),
                                       loc=loc, input=value)])


def _dump(value: BaseModel, info: Any) -> Any:
    return value.model_dump(mode=info.mode, exclude_none=False)


def Node(kind: str) -> Any:  # noqa: N802 - reads like a type in annotations
    """Annotation for a field holding a component node of registry kind `kind`."""
    return Annotated[BaseModel, NodeOf(kind)]


def NodeFields(kind: str, *fields: str) -> Any:  # noqa: N802
    """A stage param holding a node of `kind` with only `fields` (plus `type`) taken from the
    spec: the positive list of what the stage depends on."""
    return Annotated[BaseModel, NodeFieldsOf(kind, tuple(fields))]
