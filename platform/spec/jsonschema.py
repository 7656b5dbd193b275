"""JSON Schema of the whole spec, every registered component's config included.

Point the YAML language server at it for completion and inline errors:
`# yaml-language-server: $schema=./retro.schema.json` at the top of a spec.
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import TypeAdapter

from retro.platform.registry import KINDS, registry
from retro.platform.spec.model import Spec

REF = "#/$defs/{model}"


def spec_json_schema() -> dict[str, Any]:
    registry.load_plugins()
    schema = Spec.model_json_schema(ref_template=REF)
    defs = schema.pop("$defs", {})
    for kind, description in KINDS.items():
        if kind == "stage":
            continue
        models = [e.node_model() for e in registry.entries(kind)]
        if not models:
            defs[f"node-{kind}"] = {"type": "object", "description": description}
            continue
        sub = TypeAdapter(Union[tuple(models)]).json_schema(ref_template=REF)  # type: ignore
        defs.update(sub.pop("$defs", {}))
        names = ", ".join(registry.names(kind))
        defs[f"node-{kind}"] = {**sub, "description": f"{description} One of: {names}."}
    schema["$defs"] = defs
    schema = _link_nodes(schema)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "retro experiment spec"
    return schema


def _link_nodes(value: Any) -> Any:
    """Replace the `x-retro-node` placeholders NodeOf emits with refs to the kind's union."""
    if isinstance(value, dict):
        if "x-retro-node" in value:
            return {"$ref": f"#/$defs/node-{value['x-retro-node']}"}
        return {k: _link_nodes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_link_nodes(v) for v in value]
    return value
