"""Planning: validated spec variants -> one DAG of content-keyed stages, shared across variants.

Pure and fast (no Ray, no torch): `retro plan` and the first step of `retro run` call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from retro.platform.errors import SpecError, SpecIssue
from retro.platform.datahash import DataHasher, DataKeys
from retro.platform.hashing import content_key
from retro.platform.registry import close_matches, registry
from retro.platform.spec import LoadedSpec, Variant
from retro.platform.spec.model import ResourceRequest
from retro.platform.spec.node import PICKED
from retro.platform.spec.types import data_paths, path_exists
from retro.platform.stage import Pick, Recipe, StageCall, StageDef
from retro.platform.store import ArtifactStore

_MISSING = object()


@dataclass
class PlannedStage:
    """A unique (stage type, key) node of the run's DAG."""

    id: str                       # "<name>@<key[:8]>", unique in the plan
    name: str
    stage: str
    version: str
    key: str
    params: dict[str, Any]
    inputs: dict[str, str]        # slot -> id of the producing PlannedStage
    resources: ResourceRequest
    distributed: bool
    seed: int
    variants: list[str] = field(default_factory=list)
    cached: bool = False
    force: bool = False           # `retro run --rerun NAME`: recompute even if the key exists
    info: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # spec location -> DataDigest it keys

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "stage": self.stage, "version": self.version,
                "key": self.key, "params": self.params, "inputs": self.inputs,
                "resources": self.resources.model_dump(), "distributed": self.distributed,
                "variants": self.variants, "cached": self.cached, "info": self.info,
                "data": {loc: d.to_json() for loc, d in self.data.items()}}


@dataclass
class Plan:
    stages: list[PlannedStage]                     # topological order
    variants: dict[str, dict[str, str]]            # variant -> call name -> stage id
    missing_data: list[tuple[str, str]] = field(default_factory=list)

    def by_id(self, stage_id: str) -> PlannedStage:
        return next(s for s in self.stages if s.id == stage_id)

    @property
    def to_run(self) -> list[PlannedStage]:
        return [s for s in self.stages if not s.cached]

    def to_json(self) -> dict[str, Any]:
        return {"stages": [s.to_json() for s in self.stages], "variants": self.variants,
                "missing_data": [{"path": p, "value": v} for p, v in self.missing_data],
                "totals": {"stages": len(self.stages), "to_run": len(self.to_run),
                           "cached": len(self.stages) - len(self.to_run),
                           "shared": sum(len(s.variants) > 1 for s in self.stages)}}


def build_plan(loaded: LoadedSpec, store: ArtifactStore | None = None,
               with_info: bool = False) -> Plan:
    """Resolve every variant's stage calls, key them, and merge equal keys.

    Raises:
        SpecError: a recipe asked for an unknown stage or a resources entry names no stage.
    """
    nodes: dict[str, PlannedStage] = {}
    variants: dict[str, dict[str, str]] = {}
    # Data enters keys by content, through the store's hash cache (validate only reads it).
    hasher = DataHasher(store.root if store else loaded.spec.store.path, write=bool(store))
    for variant in loaded.variants:
        variants[variant.name] = _plan_variant(variant, nodes, hasher)
    hasher.save()
    _check_resources(loaded, variants)
    ordered = list(nodes.values())  # insertion order is topological (inputs planned first)
    if store is not None:
        for node in ordered:
            node.cached = store.exists(node.stage, node.key)
    if with_info:
        specs = {v.name: v.spec for v in loaded.variants}
        for node in ordered:
            node.info = _estimate(node, specs[node.variants[0]])
    missing = [(p, v) for variant in loaded.variants for p, v in data_paths(variant.spec)
               if not path_exists(v)]
    return Plan(ordered, variants, sorted(set(missing)))


def _plan_variant(variant: Variant, nodes: dict[str, PlannedStage],
                  hasher: DataHasher) -> dict[str, str]:
    spec = variant.spec
    data_keys = DataKeys(spec, hasher)
    recipe = registry.get("recipe", spec.recipe.type).obj(spec.recipe)
    calls: list[StageCall] = list(recipe.stages(spec))
    check_wiring(spec.recipe.type, calls)
    dumped = spec.model_dump(mode="json")
    ids: dict[str, str] = {}
    keys: dict[str, str] = {}
    for call in _toposort(calls):
        sdef: StageDef = registry.get("stage", call.stage).obj
        raw = {name: _lookup(dumped, path, call) for name, path in call.reads.items()}
        params = _params(sdef, {**raw, **call.consts}, spec.recipe.type, call)
        input_keys = {slot: keys[src.name] for slot, src in call.inputs.items()}
        key_params, data = data_keys.key_params(call.reads, params, call.consts)
        key = content_key(call.stage, sdef.version, key_params, input_keys)
        node_id = f"{call.name}@{key[:8]}"
        if node_id not in nodes:
            nodes[node_id] = PlannedStage(
                node_id, call.name, call.stage, sdef.version, key, params,
                {slot: ids[src.name] for slot, src in call.inputs.items()},
                stage_resources(spec.resources, call.name),
                sdef.distributed, spec.seed)
            nodes[node_id].data = data
        nodes[node_id].variants.append(variant.name)
        ids[call.name], keys[call.name] = node_id, key
    return ids


def stage_resources(resources: Any, name: str) -> ResourceRequest:
    """`resources.stages.<name>` over `resources.default`: the fields the entry sets win."""
    entry = resources.stages.get(name)
    if entry is None:
        return resources.default
    return resources.default.model_copy(update={f: getattr(entry, f)
                                                for f in entry.model_fields_set})


def check_wiring(recipe: str, calls: list[StageCall]) -> None:
    """Every call names a declared stage, passes each required slot it declares and no other.

    Raises:
        SpecError: one issue per problem, naming recipe, call, stage and slot.
    """
    issues = []
    for call in calls:
        where = f"recipe {recipe!r}, stage call {call.name!r} (stage {call.stage!r})"
        try:
            sdef = registry.get("stage", call.stage).obj
        except Exception as e:  # noqa: BLE001 - ComponentNotFound with close matches
            issues.append(SpecIssue("recipe", f"{where}: {e}"))
            continue
        declared = sorted(sdef.inputs)
        for slot in call.inputs:
            if slot not in sdef.inputs:
                close = close_matches(slot, declared)
                issues.append(SpecIssue("recipe", f"{where} passes input slot {slot!r}, which "
                                        "the stage does not declare", hint=(
                                            f"did you mean {close[0]!r}? " if close else "")
                                        + f"its slots: {', '.join(declared) or '(none)'}"))
        for slot in sdef.required:
            if slot not in call.inputs:
                issues.append(SpecIssue("recipe", f"{where} misses required input slot "
                                        f"{slot!r} ({sdef.inputs[slot].doc})",
                                        hint=f"its slots: {', '.join(declared)}"))
        for slot, src in call.inputs.items():
            if not isinstance(src, StageCall):
                issues.append(SpecIssue("recipe", f"{where}: input {slot!r} must be the "
                                        f"StageCall handle of its producer, not {src!r}"))
    if issues:
        raise SpecError(issues)


def _params(sdef: StageDef, values: dict[str, Any], recipe: str, call: StageCall) -> dict:
    """The read values validated into the stage's params model, dumped: exactly the key's
    params (fields the model does not declare never reach the stage)."""
    try:
        return sdef.params.model_validate(values).model_dump(mode="json")
    except ValidationError as e:
        raise SpecError([SpecIssue(
            "recipe", f"recipe {recipe!r}, stage call {call.name!r} (stage {call.stage!r}): "
            f"param {'.'.join(map(str, err['loc'])) or '(root)'}: {err['msg']}",
            hint=f"declared params: {', '.join(sdef.params.model_fields) or '(none)'}")
            for err in e.errors()]) from None


def _lookup(data: Any, path: "str | Pick", call: StageCall) -> Any:
    if isinstance(path, Pick):
        value = _lookup(data, path.path, call)
        picked = {k: v for k, v in value.items() if k in ("type", *path.fields)}
        return {**picked, PICKED: True} if "type" in value else picked   # a node, narrowed
    node = data
    for part in path.split(".") if path else []:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(f"stage {call.name!r} reads spec path {path!r}, which does not exist")
    return node


def _estimate(node: PlannedStage, spec: Any) -> dict[str, Any]:
    """`retro plan`'s info column: the stage's own estimate, then its recipe's (which sees the
    whole spec, e.g. to count parameters and cost a training stage)."""
    sdef: StageDef = registry.get("stage", node.stage).obj
    params = sdef.params.model_validate(node.params)
    info = sdef.estimate(params)
    recipe: Recipe = registry.get("recipe", spec.recipe.type).obj(spec.recipe)
    info.update(recipe.estimate(spec, node.name, params) or {})
    return info


def _toposort(calls: list[StageCall]) -> list[StageCall]:
    by_name = {c.name: c for c in calls}
    if len(by_name) != len(calls):
        raise ValueError("recipe produced duplicate stage names")
    out, state = [], {}

    def visit(c: StageCall) -> None:
        if state.get(c.name) == "done":
            return
        if state.get(c.name) == "active":
            raise ValueError(f"recipe produced a cycle through stage {c.name!r}")
        state[c.name] = "active"
        for src in c.inputs.values():
            if by_name.get(src.name) is not src:
                raise ValueError(f"stage {c.name!r} takes input from {src.name!r}, a call the "
                                 "recipe did not return")
            visit(src)
        state[c.name] = "done"
        out.append(c)

    for c in calls:
        visit(c)
    return out


def _check_resources(loaded: LoadedSpec, variants: dict[str, dict[str, str]]) -> None:
    names = sorted({name for calls in variants.values() for name in calls})
    issues = []
    for variant in loaded.variants:
        for name in variant.spec.resources.stages:
            if name not in names:
                close = close_matches(name, names)
                issues.append(SpecIssue(
                    f"resources.stages.{name}", "no stage of this name in the plan",
                    *loaded.source.locate(("resources", "stages", name)), name, True,
                    (f"did you mean {' or '.join(map(repr, close))}? " if close else "")
                    + f"stages: {', '.join(names)}"))
    if issues:
        raise SpecError(issues)


def force_rerun(plan: Plan, names: list[str]) -> None:
    """Mark every stage called one of `names` to be recomputed (`retro run --rerun`)."""
    known = sorted({s.name for s in plan.stages})
    for name in names:
        if name not in known:
            from retro.platform.errors import UserError

            close = close_matches(name, known)
            raise UserError(f"--rerun {name!r}: no stage of this name in the plan"
                            + (f"; did you mean {close[0]!r}?" if close else "")
                            + f" Stages: {', '.join(known)}")
    for node in plan.stages:
        if node.name in names:
            node.cached, node.force = False, True
