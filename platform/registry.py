"""Component registries: one per extension point, filled by decorators and entry points.

A spec picks a component by `type:` name. Each registered component exposes a pydantic `Config`
(extra="forbid"); the registry derives from it a *node model* that also carries the literal
`type` field, so a validated node dumps back to the YAML it came from. Shared specs can only name
registered components: there is no import-by-dotted-path escape hatch, so a spec never runs code.

Third-party packages plug in through the entry-point group `retro.components`: each entry point
is a callable (or module) that registers its components when loaded.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, create_model

ENTRY_POINT_GROUP = "retro.components"

KINDS: dict[str, str] = {
    # The spec's sections (the platform's public contract, spec/model.py) and stages. Kinds
    # inside a section's components (embedder, index, ...) are added by the components that
    # define them (`Registry.add_kind`), so a new kind needs no platform edit.
    "recipe": "Turns a validated spec into the DAG of stages an experiment needs.",
    "corpus": "Reads documents (id, title, text) from files on disk.",
    "tokenizer": "Maps text to token ids for the decoder (BPE files, local HF dirs, trained BPE).",
    "retriever": "Chunking + embedding + index + neighbour settings, or a sparse retriever.",
    "model": "The language model: decoder, Retro encoder and chunked cross-attention.",
    "trainer": "A training stage's loop and hyper-parameters (pretraining, retro-fitting).",
    "instruct": "Instruction tuning: the blend of sources and the SFT hyper-parameters.",
    "evaluator": "Measures a model (perplexity, QA, ...) and writes an eval report.",
    "tracker": "Receives configs, metrics and artifact references (W&B, local JSONL, ...).",
    "stage": "A pure function (params, input artifacts) -> one content-addressed artifact.",
}


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors; instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True,
                              protected_namespaces=())


@dataclass
class Entry:
    kind: str
    name: str
    obj: Any
    default: bool = False
    version: str = "1"
    _node_model: type[BaseModel] | None = field(default=None, repr=False)

    @property
    def config_cls(self) -> type[BaseModel] | None:
        return getattr(self.obj, "Config", None)

    @property
    def doc(self) -> str:
        text = (getattr(self.obj, "__doc__", None) or "").strip()
        return text.splitlines()[0] if text else ""

    @property
    def module(self) -> str:
        return getattr(self.obj, "__module__", "?")

    def node_model(self) -> type[BaseModel]:
        """The config class plus a `type: Literal[name]` field, built once."""
        if self._node_model is None:
            base = self.config_cls or StrictModel
            self._node_model = create_model(
                f"{self.kind.title().replace('-', '')}_{self.name.replace('-', '_')}",
                __base__=base,
                __doc__=self.doc or base.__doc__,
                type=(Literal[self.name], self.name),  # type: ignore[valid-type]
            )
        return self._node_model


class Registry:
    """All registries, keyed by kind. The only module-level mutable state in retro."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self._plugins_loaded = False

    def add_kind(self, kind: str, description: str) -> None:
        """Declare a component kind (idempotent), e.g. `embedder` inside `retriever` nodes."""
        KINDS.setdefault(kind, description)
        self._entries.setdefault(kind, {})

    def register(self, kind: str, name: str, *, default: bool = False,
                 version: str = "1") -> Callable[[Any], Any]:
        """Decorator registering `obj` as component `name` of `kind`.

        Args:
            kind: one of `KINDS`.
            name: the `type:` name specs use.
            default: used when a spec node of this kind gives no `type`.
            version: part of a stage's content key; bump it when outputs change.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown registry kind {kind!r}; known: {', '.join(KINDS)}")

        def deco(obj: Any) -> Any:
            self._entries[kind][name] = Entry(kind, name, obj, default, version)
            return obj

        return deco

    def load_plugins(self) -> None:
        """Load built-in and third-party components through the entry-point group, once."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            loaded = ep.load()
            if callable(loaded):
                loaded()

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def entries(self, kind: str) -> list[Entry]:
        return [self._entries[kind][n] for n in self.names(kind)]

    def default(self, kind: str) -> Entry | None:
        return next((e for e in self._entries[kind].values() if e.default), None)

    def get(self, kind: str, name: str) -> Entry:
        """The entry for `name`; raises ComponentNotFound with close matches."""
        from retro.platform.errors import ComponentNotFound

        if kind not in self._entries:
            raise ComponentNotFound("registry", kind, sorted(KINDS), close_matches(kind, KINDS))
        try:
            return self._entries[kind][name]
        except KeyError:
            known = self.names(kind)
            raise ComponentNotFound(kind, name, known, close_matches(name, known)) from None

    def build(self, kind: str, node: Any, **runtime: Any) -> Any:
        """The one way from a spec node to an object: `Component(validated node, **runtime)`.

        Args:
            kind: registry kind (`corpus`, `embedder`, ...).
            node: a validated node model, or its JSON form with its `type` (stage params
                shipped to workers).
            runtime: what the component needs besides its config (e.g. an embedding dim).
        """
        self.load_plugins()
        if isinstance(node, BaseModel):
            node = node.model_dump(mode="json")
        entry = self.get(kind, node["type"])
        from retro.platform.spec.node import PICKED, narrowed

        if node.get(PICKED):  # a stage's narrowed node (NodeFields): its fields, defaults else
            return entry.obj(narrowed(kind, node), **runtime)
        return entry.obj(entry.node_model().model_validate(node), **runtime)


def close_matches(name: str, candidates) -> list[str]:
    return difflib.get_close_matches(str(name), list(candidates), n=3, cutoff=0.6)


registry = Registry()
register = registry.register
