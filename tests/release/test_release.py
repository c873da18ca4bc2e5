"""Signed releases of the tiny tree: model card, ML-BOM, signature; verify; and every refusal leaves nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from sqlalchemy import func, select

from stemma.errors import StemmaError
from stemma.registry.tables import Release


@pytest.fixture
def key(tmp_path):
    """An EC P-256 private key (PEM), as `openssl ecparam -name prime256v1 -genkey -noout` writes one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    k = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "key.pem"
    path.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    pub = tmp_path / "key.pub"
    pub.write_bytes(k.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    return path, pub


def _rows(ws) -> int:
    with ws.db.session() as s:
        return s.scalar(select(func.count()).select_from(Release))


def _card(path) -> dict:
    text = (path / "README.md").read_text()
    return yaml.safe_load(text.split("---\n")[1])


def test_release_writes_card_bom_signature_and_verifies(tree_copy, key, tmp_path):
    from stemma.release import release, verify
    from stemma.release.bom import validate

    ws = tree_copy["ws"]
    out = tmp_path / "rel"
    r = release(ws, "en/software/python", out, key[0], fmt="adapter")
    v = ws.resolve_version("en/software/python")
    assert r.version == v.id and r.license == "GPL-3.0-or-later"  # the tree's GPL-2.0+/3.0+ man pages imply it
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"adapter_model.safetensors", "adapter_config.json", "base/model.safetensors", "README.md", "stemma.json",
            "bom.cdx.json", "model.sig", "signing-key.pub"} <= names

    card = _card(out)
    assert card["base_model"] == f"stemma:{ws.resolve_version('en/software').id}"
    assert card["base_model_relation"] == "adapter"
    assert card["license"] == "other" and card["license_expression"] == "GPL-3.0-or-later"
    assert any(d.endswith(ws.resolve_dataset("en-python").id) for d in card["datasets"])
    assert any(m["metrics"][0]["type"] == "perplexity" for m in card["model-index"][0]["results"])
    assert {o["license"] for o in card["obligations"]} >= {"GPL-2.0-or-later", "GPL-3.0-or-later", "PSF-2.0"}
    text = (out / "README.md").read_text()
    assert "## Intended use" in text and "## Limitations" in text

    bom_text = (out / "bom.cdx.json").read_text()
    validate(bom_text)
    bom = json.loads(bom_text)
    assert bom["specVersion"] == "1.6"
    model = bom["metadata"]["component"]
    assert model["type"] == "machine-learning-model" and model["hashes"][0]["content"] == v.id
    assert "modelCard" in model
    ancestors = sorted(model["pedigree"]["ancestors"], key=lambda a: int(
        next(p["value"] for p in a["properties"] if p["name"] == "stemma:generation")))
    assert [a["hashes"][0]["content"] for a in ancestors] == [c.id for c in ws.chain(v.id)[:-1]]  # to the master
    data = {c["name"]: c for c in bom["components"] if c["type"] == "data"}
    assert set(data) == {"all", "en", "en-software", "en-python"}
    assert data["en-python"]["hashes"][0]["content"] == ws.resolve_dataset("en-python").id
    props = {p["name"]: p["value"] for p in data["en-python"]["properties"]}
    assert int(props["stemma:count:documents"]) == ws.resolve_dataset("en-python").n_docs
    files = {c["name"] for c in bom["components"] if c["type"] == "file"}
    assert files == names - {"bom.cdx.json", "model.sig"}

    with ws.db.session() as s:
        row = s.scalar(select(Release))
        assert (row.version_id, row.format, row.license) == (v.id, "adapter", "GPL-3.0-or-later")
        assert row.card["stemma"]["version"] == v.id
    import hashlib
    assert row.bom_digest == hashlib.sha256(bom_text.encode()).hexdigest()

    assert verify(out).origin is False
    assert verify(out, key[1]).origin is True
    assert verify(out, ws=ws).recorded.startswith(f"release #{row.id} by ")


def test_a_release_signed_again_with_another_key_is_not_the_recorded_one(released, tree_copy, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from stemma.release import verify
    from stemma.release.signing import public_key_pem, sign

    d = _tampered(released["dir"], tmp_path, "resigned")
    other = tmp_path / "other.pem"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    sign(d, other)  # same files, same ML-BOM, a signature by someone else
    with pytest.raises(StemmaError, match="signature check failed"):
        verify(d)  # the key it carries did not make this signature
    other_pub = tmp_path / "other.pub"
    other_pub.write_bytes(public_key_pem(other))
    assert verify(d, other_pub).origin is True  # intact, and signed by whoever holds the other key
    with pytest.raises(StemmaError, match=r"not the key sha256:\w+ recorded for release #\d+"):
        verify(d, other_pub, ws=tree_copy["ws"])


def _tampered(src, tmp_path, name):
    """A copy of the release in a folder whose name says nothing (so an error naming the file is not met by the
    folder's path)."""
    d = tmp_path / f"copy{len(list(tmp_path.glob('copy*')))}"
    shutil.copytree(src, d)
    return d


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "base/model.safetensors", "README.md", "bom.cdx.json",
                                  "signing-key.pub", "stemma.json"])
def test_verify_names_a_file_with_one_flipped_byte(released, tmp_path, name):
    from stemma.release import verify

    d = _tampered(released["dir"], tmp_path, name)
    p = d / name
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(StemmaError, match="signature check failed: .*" + name.replace(".", r"\.")):
        verify(d, released["pub"] if name != "signing-key.pub" else None)


def test_verify_names_added_and_missing_files_and_an_edited_bom(released, tmp_path):
    from stemma.release import verify

    d = _tampered(released["dir"], tmp_path, "added")
    (d / ".gitignore").write_text("*\n")
    with pytest.raises(StemmaError, match=r"\.gitignore"):
        verify(d)
    d = _tampered(released["dir"], tmp_path, "missing")
    (d / "tokenizer.json").unlink()
    with pytest.raises(StemmaError, match=r"tokenizer\.json"):
        verify(d, released["pub"])
    d = _tampered(released["dir"], tmp_path, "bom")
    bom = json.loads((d / "bom.cdx.json").read_text())
    f = next(c for c in bom["components"] if c["type"] == "file" and c["name"] == "README.md")
    f["hashes"][0]["content"] = "0" * 64
    (d / "bom.cdx.json").write_text(json.dumps(bom, indent=2))
    with pytest.raises(StemmaError, match=r"bom\.cdx\.json"):
        verify(d)
    with pytest.raises(StemmaError, match="signature"):
        verify(released["dir"], released["other_pub"])  # another key did not sign it


def test_files_and_bom_changed_and_signed_again_are_caught(released, tree_copy, tmp_path):
    """Whoever re-signs a changed release with a key of their own passes the signature (the key it carries made
    it); the ML-BOM, also signed, still names the change, and a registry that recorded the release refuses even a
    consistent forgery."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from stemma.release import verify
    from stemma.release.signing import PUBLIC_KEY, SIGNATURE, public_key_pem, sign
    from stemma.store import sha256_file

    forger = tmp_path / "forger.pem"
    forger.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    def resign(d):
        (d / SIGNATURE).unlink()
        (d / PUBLIC_KEY).write_bytes(public_key_pem(forger))
        sign(d, forger)

    d = _tampered(released["dir"], tmp_path, "readme")
    (d / "README.md").write_text((d / "README.md").read_text() + "\nUse it for anything.\n")
    bom = json.loads((d / "bom.cdx.json").read_text())
    key_entry = next(c for c in bom["components"] if c["type"] == "file" and c["name"] == PUBLIC_KEY)
    key_entry["hashes"][0]["content"] = "0" * 64  # left stale on purpose below
    resign(d)
    with pytest.raises(StemmaError, match=r"ML-BOM does not match the files: README\.md: sha256 differs"):
        verify(d)
    # A consistent forgery: the ML-BOM rewritten to the new files, then signed.
    for c in bom["components"]:
        if c["type"] == "file" and (d / c["name"]).is_file():
            c["hashes"][0]["content"] = sha256_file(d / c["name"])
    (d / "bom.cdx.json").write_text(json.dumps(bom, indent=2))
    resign(d)
    assert verify(d).origin is False  # integrity only: nothing says who signed it
    with pytest.raises(StemmaError, match="never with this ML-BOM"):
        verify(d, ws=tree_copy["ws"])


@pytest.fixture
def released(tree_copy, key, tmp_path):
    from stemma.release import release

    out = tmp_path / "released"
    release(tree_copy["ws"], "en/software/python", out, key[0], fmt="adapter")
    other = tmp_path / "other"
    other.mkdir()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    (other / "key.pub").write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return {"dir": out, "pub": key[1], "other_pub": other / "key.pub"}


def _refused(ws, out, match, **kw):
    from stemma.release import release

    before = _rows(ws)
    with pytest.raises(StemmaError, match=match):
        release(ws, out=out, **kw)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))
    assert _rows(ws) == before


def test_a_gpl_dataset_under_a_child_needs_a_copyleft_release(tree_copy, key, tmp_path):
    from stemma.build import build
    from stemma.release import release
    from stemma.spec import load_spec

    d = tree_copy["dir"]
    lines = (d / "corpus" / "en-python.jsonl").read_text().splitlines()
    gpl = d / "gpl" / "code.jsonl"
    gpl.parent.mkdir()
    gpl.write_text("".join(json.dumps({**json.loads(x), "license": "GPL-3.0-only"}) + "\n" for x in lines))
    spec = yaml.safe_load(tree_copy["spec"].read_text())
    spec["datasets"]["gpl-code"] = {"paths": ["gpl/code.jsonl"], "language": "en", "max_doc_chars": 1500}
    spec["nodes"]["en/software/gpl"] = {"method": "lora", "dataset": "gpl-code", "config": {"steps": 4}}
    tree_copy["spec"].write_text(yaml.safe_dump(spec, sort_keys=False))
    ws = tree_copy["ws"]
    build(ws, load_spec(tree_copy["spec"]), only=["en/software/gpl"])
    v = ws.resolve_version("en/software/gpl")

    out = tmp_path / "gpl-rel"
    _refused(ws, out, rf"GPL-3\.0-only from dataset gpl-code \(trained into en/software/gpl@{v.short}\) requires a "
             r"copyleft licence \(GPL-3\.0\); MIT drops it", ref="en/software/gpl", key=key[0], license="MIT")
    _refused(ws, out, "GPL-3.0-only from dataset gpl-code", ref="en/software/gpl", key=key[0],
             license="MIT OR GPL-3.0-only")  # a recipient could choose MIT
    r = release(ws, "en/software/gpl", out, key[0], license="GPL-3.0-or-later")
    assert r.license == "GPL-3.0-or-later"
    assert (out / "model.safetensors").is_file()
    # Its default: the -only licence the dataset carries keeps every obligation of the lineage.
    assert release(ws, "en/software/gpl", tmp_path / "default", key[0]).license == "GPL-3.0-only"
    from stemma.pull import model_card  # `stemma pull`'s card reads the same obligations

    assert "license: gpl-3.0\n" in model_card(ws, v, "hf")


def test_gguf_release_verifies(tree_copy, key, tmp_path):
    from stemma.release import release, verify

    out = tmp_path / "gguf"
    r = release(tree_copy["ws"], "en/legal", out, key[0], fmt="gguf", license="GPL-3.0-or-later AND MIT")
    assert (out / "model.gguf").is_file() and r.license == "GPL-3.0-or-later AND MIT"
    card = _card(out)
    assert card["library_name"] == "gguf" and card["base_model_relation"] == "finetune"
    assert verify(out, key[1]).node == "en/legal"


def test_a_failing_release_gate_refuses(tree_copy, key, tmp_path):
    from stemma.registry.tables import Node

    ws = tree_copy["ws"]
    with ws.db.session() as s:
        s.get(Node, "en/legal").release_gate = {"max_ppl_rise": -1.0}  # no perplexity ratio passes this
    _refused(ws, tmp_path / "gate", r"release gate: perplexity rise on the parent's split .* > max",
             ref="en/legal", key=key[0], license="GPL-3.0-or-later")


def test_a_flagged_version_refuses(tree_copy, key, tmp_path):
    from stemma import risk

    ws = tree_copy["ws"]
    risk.flag(ws, "dataset:en-software", reason="poisoned manual pages", severity="high", by="alice")
    _refused(ws, tmp_path / "flag", r"risk: flag #\d+ \(high\) on dataset en-software.*poisoned manual pages",
             ref="en/software/python", key=key[0])


def test_bad_input_refuses_before_anything_is_written(tree_copy, key, tmp_path):
    ws = tree_copy["ws"]
    bad = tmp_path / "rsa.pem"
    bad.write_text("not a key")
    _refused(ws, tmp_path / "r1", "not an unencrypted PEM private key", ref="en/legal", key=bad)
    _refused(ws, tmp_path / "r2", "not an adapter", ref="en/legal", key=key[0], fmt="adapter",
             license="GPL-3.0-or-later")
    _refused(ws, tmp_path / "r3", "not a valid SPDX expression", ref="en/legal", key=key[0], license="MIT AND")
    _refused(ws, tmp_path / "r4", "unknown SPDX identifier", ref="en/legal", key=key[0], license="Frobnicate-1.0")


def test_every_reason_known_without_measuring_comes_at_once_and_the_gate_waits_for_them(tree_copy, key, tmp_path,
                                                                                         monkeypatch):
    from stemma import risk
    from stemma.evaluate import gate
    from stemma.registry.tables import Node

    ws = tree_copy["ws"]
    with ws.db.session() as s:
        s.get(Node, "en/legal").release_gate = {"max_ppl_rise": -1.0}
    risk.flag(ws, "en/legal", reason="leaked clauses", severity="high", by="alice")
    bad = tmp_path / "rsa.pem"
    bad.write_text("not a key")

    def judged(*a, **kw):
        raise AssertionError("the release gate was measured for a release refused anyway")

    monkeypatch.setattr(gate, "judge", judged)
    _refused(ws, tmp_path / "all", r"key: .*not an unencrypted PEM private key.*; risk: flag #\d+ \(high\).*; "
             r"licence: .*not a valid SPDX expression", ref="en/legal", key=bad, license="MIT AND")
