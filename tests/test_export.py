"""Exported directories load in plain transformers / peft and give stemma's own logits."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stemma.errors import StemmaError
from stemma.export import export


@pytest.mark.parametrize("node", ["master", "en", "en/legal", "en/software", "en/software/python"])
def test_merged_export_loads_in_transformers_with_equal_logits(any_copy, node, tmp_path):
    ws = any_copy["ws"]
    out = export(ws, node, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("The manual page of grep describes its options.")["input_ids"]])
    ours = ws.load_model(ws.resolve_version(node).id)
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5)
    meta = json.loads((out / "stemma.json").read_text())
    assert meta["version"] == ws.resolve_version(node).id
    assert meta["chain"][0]["node"] == "master"


@pytest.mark.parametrize("node", ["en/software", "en/software/python"])
def test_adapter_export_loads_in_peft_with_equal_logits(any_copy, node, tmp_path):
    """The adapter (``en/software``) and the chain (``en/software/python``, whose base has ``en/software`` merged):
    the exported base is what the adapter applies to, and peft on it gives stemma's logits."""
    from peft import PeftModel

    ws = any_copy["ws"]
    v = ws.resolve_version(node)
    out = export(ws, node, tmp_path / "out", fmt="adapter")
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    ids = torch.randint(0, 500, (2, 24))
    with torch.no_grad():
        below = ws.load_model(v.id, below=True)(input_ids=ids).logits
        assert torch.allclose(base(input_ids=ids).logits, below, atol=1e-5)
        model = PeftModel.from_pretrained(base, out)
        ours = ws.load_model(v.id)(input_ids=ids).logits
        assert torch.allclose(model(input_ids=ids).logits, ours, atol=1e-5)
        assert not torch.allclose(ours, below, atol=1e-5)  # the adapter changes the model
    meta = json.loads((out / "stemma.json").read_text())
    assert meta["adapters"][-1] == v.id and meta["base"] == ws.plan(v.id).base.id


def test_export_refuses_non_empty_target_and_leaves_nothing_on_error(tree_copy, tmp_path):
    ws = tree_copy["ws"]
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(StemmaError, match="not empty"):
        export(ws, "en", target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    with pytest.raises(StemmaError, match="not an adapter"):
        export(ws, "en", tmp_path / "x", fmt="adapter")
    with pytest.raises(StemmaError, match="unknown node"):
        export(ws, "nope", tmp_path / "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] or not any(
        p.name.startswith(".") for p in tmp_path.iterdir())


def test_export_of_corrupted_version_fails_cleanly(tree_copy, tmp_path):
    ws = tree_copy["ws"]
    v = ws.resolve_version("en/legal")
    blob = ws.store.path(v.manifest["files"]["model.safetensors"])
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(StemmaError, match="corrupt"):
        export(ws, "en/legal", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    report = ws.fsck()
    assert report.corrupt == [v.manifest["files"]["model.safetensors"]]
