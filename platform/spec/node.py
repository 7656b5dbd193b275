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


def _error(loc: tuple, error_type: str, template: str, value: Any, **ctx: Any) -> ValidationError:
    return ValidationError.from_exception_data(
        "component", [InitErrorDetails(type=PydanticCustomError(error_type, template, ctx),
                                       loc=loc, input=value)])


def _dump(value: BaseModel, info: Any) -> Any:
    return value.model_dump(mode=info.mode, exclude_none=False)


def Node(kind: str) -> Any:  # noqa: N802 - reads like a type in annotations
    """Annotation for a field holding a component node of registry kind `kind`."""
    return Annotated[BaseModel, NodeOf(kind)]
