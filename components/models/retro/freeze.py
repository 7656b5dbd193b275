"""Freeze policies: which parameters train, chosen structurally.

    freeze: unfrozen                      # everything trains (NVIDIA's Retro-fitting)
    freeze: frozen                        # decoder frozen, encoder + CCA train (RETRO's RETROfit)
    freeze: {frozen: [embeddings, lm_head, "decoder.blocks:1-12"]}
    freeze: {trainable: [encoder, cca, "decoder.blocks:20-24"]}

Selectors (block and CCA numbers are 1-based, like `cca_layers`):
    embeddings        input token (and gpt2 position) embeddings, also used by the encoder
    lm_head           output head (the same tensor as embeddings when they are tied)
    decoder           every decoder parameter (embeddings, blocks, final norm, head)
    decoder.blocks    all decoder layers; `decoder.blocks:N` or `decoder.blocks:A-B` a range
    decoder.norm      the final norm
    encoder           the Retro encoder
    cca               every chunked cross-attention; `cca:N` / `cca:A-B` by decoder layer
A tied embedding/head tensor matches both `embeddings` and `lm_head`.

Parsing and name checks are torch-free (spec validation); `apply_freeze` needs the model.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Optional

GROUPS = ("embeddings", "lm_head", "decoder.blocks", "decoder.norm", "encoder", "cca")
"""Structural groups every parameter belongs to (counts are reported per group)."""
SELECTORS = ("embeddings", "lm_head", "decoder", "decoder.blocks", "decoder.norm", "encoder",
             "cca")
_RANGED = ("decoder.blocks", "cca")
_SEL = re.compile(r"^(?P<name>[a-z_.]+)(?::(?P<a>\d+)(?:-(?P<b>\d+))?)?$")

_PATTERNS = [
    (re.compile(r"^decoder\.(?:model\.embed_tokens|transformer\.wte|transformer\.wpe)\."),
     "embeddings"),
    (re.compile(r"^decoder\.lm_head\."), "lm_head"),
    (re.compile(r"^decoder\.(?:model\.layers|transformer\.h)\.(\d+)\."), "decoder.blocks"),
    (re.compile(r"^decoder\.(?:model\.norm|transformer\.ln_f)\."), "decoder.norm"),
    (re.compile(r"^encoder\."), "encoder"),
    (re.compile(r"^cca\.(\d+)\."), "cca"),
]


@dataclass(frozen=True)
class Selector:
    name: str
    lo: Optional[int] = None
    hi: Optional[int] = None

    def matches(self, group: str, index: Optional[int]) -> bool:
        if self.name == "decoder":
            return group in ("embeddings", "lm_head", "decoder.blocks", "decoder.norm")
        if self.name != group:
            return False
        return self.lo is None or (index is not None and self.lo <= index <= self.hi)


def parse_selector(text: str) -> Selector:
    """`decoder.blocks:3-5` -> Selector("decoder.blocks", 3, 5).

    Raises:
        ValueError: unknown name (with close matches) or a malformed range.
    """
    m = _SEL.match(text.strip())
    name = m.group("name") if m else text
    if not m or name not in SELECTORS:
        close = difflib.get_close_matches(name, SELECTORS, n=2, cutoff=0.5)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown freeze selector {text!r}{hint} Known: "
                         f"{', '.join(SELECTORS)} (ranges: decoder.blocks:A-B, cca:A-B)")
    if m.group("a") is None:
        return Selector(name)
    if name not in _RANGED:
        raise ValueError(f"freeze selector {text!r}: only {' and '.join(_RANGED)} take a range")
    lo = int(m.group("a"))
    hi = int(m.group("b") or lo)
    if not 1 <= lo <= hi:
        raise ValueError(f"freeze selector {text!r}: ranges are 1-based and A ≤ B")
    return Selector(name, lo, hi)


def resolve_policy(policy: Any) -> tuple[str, list[Selector]]:
    """Normalise a policy to (mode, selectors): mode `frozen` freezes the selected parameters,
    mode `trainable` trains only them.

    Args:
        policy: "unfrozen", "frozen", or a mapping / config with exactly one of `frozen` or
            `trainable` (a list of selector strings).
    """
    if hasattr(policy, "model_dump"):
        policy = {k: v for k, v in policy.model_dump().items() if v is not None}
    if policy == "unfrozen":
        return "frozen", []
    if policy == "frozen":
        return "trainable", [Selector("encoder"), Selector("cca")]
    if isinstance(policy, dict) and len(policy) == 1 and next(iter(policy)) in ("frozen",
                                                                               "trainable"):
        mode, items = next(iter(policy.items()))
        return mode, [parse_selector(s) for s in items]
    raise ValueError(f"freeze policy {policy!r}: use `unfrozen`, `frozen`, {{frozen: [...]}} or "
                     f"{{trainable: [...]}}")


def check_ranges(selectors: list[Selector], n_layers: int, cca_layers: list[int]) -> list[str]:
    """Problems with selector ranges against a model's real layer numbers (empty if none)."""
    problems = []
    for s in selectors:
        if s.lo is None:
            continue
        if s.name == "decoder.blocks" and s.hi > n_layers:
            problems.append(f"decoder.blocks:{s.lo}-{s.hi} exceeds the {n_layers} decoder layers")
        if s.name == "cca" and not any(s.lo <= i <= s.hi for i in cca_layers):
            problems.append(f"cca:{s.lo}-{s.hi} selects no CCA layer (CCA at {cca_layers})")
    return problems


def param_group(name: str) -> tuple[str, Optional[int]]:
    """(group, 1-based layer index or None) of a RetroForCausalLM parameter name."""
    for pattern, group in _PATTERNS:
        m = pattern.match(name)
        if m:
            index = int(m.group(1)) if m.groups() else None
            return group, (index + 1 if group == "decoder.blocks" else index)
    return "other", None


def apply_freeze(model, policy) -> dict:
    """Set `requires_grad` by the policy and count what trains.

    Args:
        model: a RetroForCausalLM.
        policy: see `resolve_policy` (the spec's `model.freeze` value).

    Returns:
        {"trainable": n, "frozen": n, "groups": {group: {"trainable": n, "frozen": n}}} with
        each tensor counted once (a tied embedding/head under `embeddings`).

    Raises:
        ValueError: a selector range outside the model, or nothing left to train.
    """
    mode, selectors = resolve_policy(policy)
    cca_layers = [int(i) for i in getattr(model, "cca", {}).keys()]
    problems = check_ranges(selectors, model.n_layers, cca_layers)
    if problems:
        raise ValueError("freeze policy does not fit the model: " + "; ".join(problems))
    names: dict[int, list[str]] = {}
    params = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    groups = {g: {"trainable": 0, "frozen": 0} for g in GROUPS}
    total = {"trainable": 0, "frozen": 0}
    for pid, p in params.items():
        places = [param_group(n) for n in names[pid]]
        hit = any(s.matches(g, i) for s in selectors for g, i in places)
        p.requires_grad_(hit if mode == "trainable" else not hit)
        state = "trainable" if p.requires_grad else "frozen"
        groups.setdefault(places[0][0], {"trainable": 0, "frozen": 0})[state] += p.numel()
        total[state] += p.numel()
    if total["trainable"] == 0:
        raise ValueError(f"freeze policy {policy!r} leaves no trainable parameter in this model "
                         f"(a plain GPT has no encoder or CCA to train under `frozen`)")
    return {**total, "groups": groups}
