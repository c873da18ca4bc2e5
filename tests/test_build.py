"""The tree end to end on a tiny corpus: build, reuse, rebuild on change, lineage, metrics, storage."""

import time

import pytest
import torch
import yaml

from stemma.build import build
from stemma.lineage import tree_rows
from stemma.spec import load_spec
from tests.conftest import tiny_spec


def test_every_node_is_built_with_lineage_and_metrics(built_tree, tree_copy):
    ws = tree_copy["ws"]
    assert [e.action for e in built_tree["events"]] == ["built"] * 5
    rows = {r.path: r for r in tree_rows(ws)}
    assert set(rows) == {"master", "en", "en/software", "en/software/python", "en/legal"}
    assert rows["en"].relation == "distill" and rows["en/software"].relation == "adapter"
    assert rows["en/legal"].relation == "finetune" and rows["master"].relation == "pretrain"
    for path, r in rows.items():
        assert r.status == "ok", path
        assert r.ppl_own is not None and r.ppl_own > 1
        if path != "master":
            assert r.parent_ppl_own and r.ppl_parent_split and r.parent_ppl_parent_split
    chain = ws.chain(ws.resolve_version("en/software/python").id)
    assert [c.row.node_path for c in chain] == ["master", "en", "en/software", "en/software/python"]
    assert len({c.row.tokenizer for c in chain}) == 1
    # The version id is the hash of its manifest, which names the parent by id.
    for parent, child in zip(chain, chain[1:]):
        assert child.manifest["parent"] == parent.id
        assert ws.store.get_json(child.id) == child.manifest


def test_children_specialise_without_forgetting(tree_copy):
    rows = {r.path: r for r in tree_rows(tree_copy["ws"])}
    for path in ("en/software", "en/software/python", "en/legal"):
        r = rows[path]
        assert r.ppl_own < r.parent_ppl_own, f"{path} did not improve on its own split"
        assert r.forgetting <= 0.15, f"{path} forgot: {r.forgetting:+.1%} on its parent's split"


def test_distilled_student_is_at_most_half_the_teacher(tree_copy):
    ws = tree_copy["ws"]
    en, master = ws.resolve_version("en"), ws.resolve_version("master")
    assert en.row.params <= 0.5 * master.row.params
    assert en.manifest["architecture"]["init_teacher_layers"] == [0, 5]


def test_adapters_store_only_their_delta_and_each_model_is_stored_once(tree_copy):
    ws = tree_copy["ws"]
    en = ws.resolve_version("en")
    for node in ("en/software", "en/software/python"):
        v = ws.resolve_version(node)
        assert set(v.manifest["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
        assert v.row.bytes <= 0.15 * en.row.bytes  # r=8 on a 64-wide toy model; the demo checks <= 5%
    referenced = ws.referenced_digests()
    on_disk = set(ws.store.iter_digests())
    assert on_disk == referenced
    weight_blobs = [d for v in (ws.resolve_version(n) for n in ("master", "en", "en/legal", "en/software",
                                                                 "en/software/python"))
                    for d in v.manifest["files"].values()]
    assert len(weight_blobs) == len([d for d in weight_blobs if d in on_disk])


def test_second_build_trains_nothing(tree_copy):
    from stemma.workspace import Workspace

    ws = Workspace.open(tree_copy["home"])
    before = set(ws.store.iter_digests())
    t0 = time.perf_counter()
    events = build(ws, load_spec(tree_copy["spec"]))
    assert [e.action for e in events] == ["reused"] * 5
    assert time.perf_counter() - t0 < 10
    assert set(ws.store.iter_digests()) == before


def test_changed_parent_rebuilds_descendants_only(tree_copy):
    from stemma.workspace import Workspace

    spec = yaml.safe_load(tree_copy["spec"].read_text())
    spec["nodes"]["en/software"]["config"]["steps"] = 30
    tree_copy["spec"].write_text(yaml.safe_dump(spec))
    ws = Workspace.open(tree_copy["home"])
    old_py = ws.resolve_version("en/software/python").id
    events = {e.node: e.action for e in build(ws, load_spec(tree_copy["spec"]))}
    assert events == {"master": "reused", "en": "reused", "en/legal": "reused", "en/software": "built",
                      "en/software/python": "built"}
    new_py = ws.resolve_version("en/software/python")
    assert new_py.id != old_py
    assert new_py.row.parent_id == ws.resolve_version("en/software").id
    assert len(ws.versions_of("en/software/python")) == 2


def test_build_only_selected_nodes_and_their_ancestors(tree_copy):
    from stemma.workspace import Workspace

    ws = Workspace.open(tree_copy["home"])
    events = build(ws, load_spec(tree_copy["spec"]), only=["en/legal"])
    assert [e.node for e in events] == ["master", "en", "en/legal"]


def test_loaded_chain_equals_manual_peft_application(tree_copy):
    """stemma's chain resolution = PEFT applied by hand, adapter by adapter, on the exported base."""
    from peft import PeftModel

    ws = tree_copy["ws"]
    v = ws.resolve_version("en/software/python")
    model = ws.load_model(v.id)
    base = ws.load_model(ws.resolve_version("en").id)
    from stemma.models.io import materialise

    for i, node in enumerate(("en/software", "en/software/python")):
        a = ws.resolve_version(node)
        d = materialise({n: ws.store.path(dg) for n, dg in a.manifest["files"].items()}, tree_copy["dir"] / f"a{i}")
        base = PeftModel.from_pretrained(base, str(d)).merge_and_unload()
    x = torch.randint(0, 500, (2, 20))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, base(input_ids=x).logits, atol=1e-5)


def test_tokenizer_mismatch_is_refused(tree_copy):
    from sqlalchemy import update

    from stemma.errors import TokenizerMismatchError
    from stemma.registry.tables import Version

    ws = tree_copy["ws"]
    v = ws.resolve_version("en/software")
    with ws.db.session() as s:
        s.execute(update(Version).where(Version.id == v.id).values(tokenizer="0" * 64))
    with pytest.raises(TokenizerMismatchError, match="differs from its base"):
        ws.load_model(ws.resolve_version("en/software/python").id)


@pytest.mark.parametrize("node,config,message", [
    ("en", {"n_layer": 5}, "node en: student has"),  # 5 of the teacher's 6 blocks
    ("en", {"n_layer": 2, "max_param_ratio": 0.1}, "node en: student has"),
    ("en", {"n_layer": 2, "n_head": 3}, "node en: "),
    ("en/software", {"r": 100}, "node en/software: LoRA rank r=100 is beyond the width"),
    ("en/software", {"target_modules": ["q_proj"]}, "node en/software: target module 'q_proj' is no linear layer"),
    ("en/software/q/ft", {}, "node en/software/q/ft: an adapter cannot be trained on the compressed variant"),
    ("en/software/q/q4", {}, "node en/software/q/q4: en/software/q is a compressed variant with no plain weights"),
])
def test_config_errors_fail_preflight_before_anything_trains(ws, tmp_path, node, config, message):
    from stemma.errors import SpecError

    path = tiny_spec(tmp_path / "spec")
    spec = yaml.safe_load(path.read_text())
    spec["nodes"]["en/software/q"] = {"method": "quantized", "parent": "en/software"}
    if node == "en/software/q/ft":
        spec["nodes"][node] = {"method": "lora", "dataset": "en-python", "parent": "en/software/q",
                               "config": {"steps": 2}}
    if node == "en/software/q/q4":
        spec["nodes"][node] = {"method": "quantized", "parent": "en/software/q", "config": {"bits": 4}}
    spec["nodes"][node]["config"] = {**spec["nodes"][node].get("config", {}), **config}
    path.write_text(yaml.safe_dump(spec))
    t0 = time.perf_counter()
    with pytest.raises(SpecError) as e:
        build(ws, load_spec(path))
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    assert time.perf_counter() - t0 < 20  # pre-flight: no curation, no training
    assert not ws.nodes() and not list(ws.store.iter_digests())  # nothing trained, nothing registered


def test_plans_refuse_what_cannot_build_on_a_compressed_variant():
    """Every compression method (both pruning modes) refuses a variant parent; an adapter is refused on one, a
    full-weight fine-tune is not."""
    from types import SimpleNamespace

    from stemma.errors import SpecError
    from stemma.methods import get
    from stemma.train.registry import Planned

    spec = SimpleNamespace(nodes={"a": SimpleNamespace(parent=None, dataset="d"),
                                  "a/q": SimpleNamespace(parent="a", dataset=None)})
    variant = Planned(None, "variant")
    node = SimpleNamespace(path="a/q/x", parent="a/q", dataset=None)
    for method, raw in [("quantized", {}), ("lowrank", {"rank": 4}), ("pruned", {}),
                        ("pruned", {"mode": "structured", "neurons": 0.25})]:
        m = get(method)
        with pytest.raises(SpecError, match="a/q is a compressed variant with no plain weights to compress; "
                                            "make a/q/x a variant of a instead"):
            m.plan(m.make_config(raw, "x"), variant, spec, node)
        assert m.plan(m.make_config(raw, "x"), Planned(None), spec, node).kind == (
            "full" if raw.get("mode") == "structured" else "variant")
    lora = get("lora")
    with pytest.raises(SpecError, match="an adapter cannot be trained on the compressed variant a/q"):
        lora.plan(lora.make_config({}, "x"), variant, spec, node)
    ft = get("finetune")
    assert ft.plan(ft.make_config({}, "x"), variant, spec, node).kind == "full"
