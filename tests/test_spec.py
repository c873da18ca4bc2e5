import ast
import dataclasses
import inspect

import pytest
import yaml

from stemma import methods
from stemma.errors import SpecError
from stemma.spec import load_spec, parse_spec


def _spec(tmp_path, nodes, datasets=None):
    (tmp_path / "c.txt").write_text("a\n\nb")
    data = {"datasets": datasets if datasets is not None else {"d": {"paths": ["c.txt"]}}, "nodes": nodes}
    return parse_spec(data, tmp_path)


def test_parents_layers_and_order_are_inferred(tmp_path):
    s = _spec(tmp_path, {
        "en/software/python": {"method": "lora", "dataset": "d"},
        "en/software": {"method": "lora", "dataset": "d"},
        "en": {"method": "distill", "dataset": "d"},
        "master": {"method": "pretrain", "dataset": "d"},
    })
    assert s.nodes["en"].parent == "master"
    assert s.nodes["en/software/python"].parent == "en/software"
    assert [s.nodes[n].layer for n in s.order] == ["master", "language", "domain", "subdomain"]
    assert s.order.index("en") < s.order.index("en/software") < s.order.index("en/software/python")
    assert s.descendants("en") == ["en/software", "en/software/python"]


@pytest.mark.parametrize(
    "nodes, message",
    [
        ({"master": {"method": "pretrain", "dataset": "d"}, "a": {"method": "lora", "parent": "b", "dataset": "d"},
          "b": {"method": "lora", "parent": "a", "dataset": "d"}}, "cycle"),
        ({"master": {"method": "pretrain", "dataset": "d"}, "x": {"method": "lora", "parent": "nope", "dataset": "d"}},
         "unknown parent"),
        ({"../x": {"method": "pretrain", "dataset": "d"}}, "invalid node name"),
        ({"Master": {"method": "pretrain", "dataset": "d"}}, "invalid node name"),
        ({"master": {"method": "teleport", "dataset": "d"}}, "unknown build method"),
        ({"master": {"method": "pretrain", "dataset": "d", "config": {"n_layers": 2}}}, "unknown config field"),
        ({"master": {"method": "pretrain", "dataset": "d", "config": {"steps": "many"}}}, "steps"),
        ({"master": {"method": "pretrain"}}, "needs a dataset"),
        ({"en": {"method": "lora", "dataset": "d", "parent": None}}, "unknown parent 'master'"),
        ({"master": {"method": "pretrain", "dataset": "d", "layer": "galaxy"}}, "unknown layer"),
    ],
)
def test_bad_specs_are_refused(tmp_path, nodes, message):
    with pytest.raises(SpecError, match=message):
        _spec(tmp_path, nodes)


def test_missing_dataset_path_is_refused(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        _spec(tmp_path, {"master": {"method": "pretrain", "dataset": "d"}}, {"d": {"paths": ["nope.txt"]}})


def test_invalid_yaml_names_the_line(tmp_path):
    p = tmp_path / "stemma.yaml"
    p.write_text("nodes:\n  master: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(p)


def test_shipped_demo_spec_is_valid():
    from pathlib import Path

    s = load_spec(Path(__file__).resolve().parents[1] / "examples" / "demo" / "stemma.yaml")
    layers = {s.nodes[n].layer for n in s.order}
    assert {"master", "language", "domain", "subdomain"} <= layers
    assert len([n for n in s.order if s.nodes[n].layer == "language"]) >= 2
    assert len([n for n in s.order if s.nodes[n].layer == "domain"]) >= 2


@pytest.mark.parametrize("name", methods.names())
def test_every_method_config_field_is_documented(name):
    """Each config field carries a docstring right below it (the dataclass is the documentation)."""
    method = methods.get(name)
    documented = set()
    for klass in inspect.getmro(method.config_cls):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(inspect.getsource(klass))
        body = tree.body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                documented.add(stmt.target.id)
    fields = {f.name for f in dataclasses.fields(method.config_cls)}
    assert fields <= documented, f"undocumented fields in {name}: {sorted(fields - documented)}"
    assert method.relation and method.name == name
    # Every field has a default or is required by design, and a minimal config round-trips through YAML.
    required = {"import": {"path": "x"}, "lowrank": {"rank": 8}, "sft": {"pairs": "x"}, "dpo": {"pairs": "x"}}
    yaml.safe_dump(dataclasses.asdict(method.make_config(required.get(name, {}), "t")))
