"""Spec loading: extends, env interpolation, typed overrides, sweeps, defaults."""

from __future__ import annotations

import textwrap

import pytest

from retro.platform.errors import SpecError
from retro.platform.spec import load_spec
from retro.platform.spec.loader import parse_override


def write(tmp, name, text):
    p = tmp / name
    p.write_text(textwrap.dedent(text))
    return p


def test_extends_merges_mappings_and_child_wins(tmp_path):
    (tmp_path / "base").mkdir()
    write(tmp_path / "base", "b.yaml", """\
        name: base
        seed: 1
        recipe: {type: toy, n: 4, factor: 3}
        tracking: none
        """)
    spec = write(tmp_path, "c.yaml", "extends: base/b.yaml\nname: child\nrecipe: {n: 6}\n")
    loaded = load_spec(spec)
    assert loaded.spec.name == "child" and loaded.spec.seed == 1
    assert (loaded.spec.recipe.n, loaded.spec.recipe.factor) == (6, 3)
    assert loaded.source.locate(("recipe", "n"))[0].endswith("c.yaml")
    assert loaded.source.locate(("recipe", "factor"))[0].endswith("b.yaml")


def test_env_interpolation_with_default(tmp_path, monkeypatch):
    spec = write(tmp_path, "s.yaml", "name: x\nrecipe: toy\ntracking: none\n"
                 "description: ${env:RETRO_T_A,fallback}/${env:RETRO_T_B}\n")
    monkeypatch.setenv("RETRO_T_B", "set")
    assert load_spec(spec).spec.description == "fallback/set"
    monkeypatch.setenv("RETRO_T_A", "here")
    assert load_spec(spec).spec.description == "here/set"


@pytest.mark.parametrize("text,value", [
    ("a.b=3", 3), ("a.b=0.5", 0.5), ("a.b=true", True), ("a.b=null", None),
    ("a.b=[1, 2]", [1, 2]), ("a.b=frozen", "frozen"), ("a.b='3'", "3"), ("a.b=", ""),
])
def test_override_values_are_typed(text, value):
    assert parse_override(text) == (("a", "b"), value)


def test_overrides_reach_nested_fields_and_list_items(tmp_path):
    spec = write(tmp_path, "s.yaml", "name: x\nrecipe: toy\ntracking: [none, stdout]\n")
    loaded = load_spec(spec, ["recipe.factor=5", "tracking.1.every=3", "seed=9"])
    assert loaded.spec.recipe.factor == 5 and loaded.spec.seed == 9
    assert loaded.spec.tracking[1].every == 3


def test_list_item_override_on_an_absent_list_creates_its_first_item(tmp_path):
    spec = write(tmp_path, "s.yaml", "name: x\nrecipe: toy\n")  # no `tracking:`
    loaded = load_spec(spec, ["tracking.0.mode=offline"])
    assert loaded.spec.tracking[0].type == "wandb" and loaded.spec.tracking[0].mode == "offline"
    with pytest.raises(SpecError) as err:
        load_spec(spec, ["tracking.2.mode=offline"])
    assert "no item 2" in str(err.value) and "tracking=[" in str(err.value)


def test_defaults_are_filled_and_dump_round_trips(tmp_path):
    spec = write(tmp_path, "s.yaml", "name: x\nrecipe: toy\n")
    loaded = load_spec(spec)
    dumped = loaded.spec.model_dump(mode="json")
    assert dumped["recipe"] == {"type": "toy", "n": 8, "factor": 2, "offset": 0, "sleep": 0.0,
                                "fail": None, "label": "", "miswire": None}
    assert dumped["tracking"][0]["type"]  # the default tracker was chosen
    again = write(tmp_path, "again.yaml", __import__("yaml").safe_dump(dumped))
    assert load_spec(again).spec == loaded.spec


def test_grid_sweep_expands_cartesian_product(tmp_path):
    spec = write(tmp_path, "s.yaml", """\
        name: x
        recipe: toy
        tracking: none
        sweep:
          grid: {recipe.offset: [1, 2], recipe.factor: [3, 4]}
        """)
    loaded = load_spec(spec)
    points = {(v.spec.recipe.offset, v.spec.recipe.factor) for v in loaded.variants}
    assert points == {(1, 3), (1, 4), (2, 3), (2, 4)}
    assert all(v.spec.sweep is None for v in loaded.variants)


def test_explicit_variants_keep_their_names(tmp_path):
    spec = write(tmp_path, "s.yaml", """\
        name: x
        recipe: toy
        tracking: none
        sweep:
          variants:
            - {name: small, set: {recipe.n: 2}}
            - {name: big, set: {recipe.n: 20}}
        """)
    loaded = load_spec(spec)
    assert [(v.name, v.spec.recipe.n) for v in loaded.variants] == [("small", 2), ("big", 20)]


def test_yaml_tags_cannot_build_objects(tmp_path):
    spec = write(tmp_path, "s.yaml", "name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(SpecError, match="YAML"):
        load_spec(spec)
