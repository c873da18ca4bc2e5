"""Updates end to end on the session's tiny tree: keys, signed files, refusals, rounds behind the gate,
downstream staleness and rebase, offers to siblings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from stemma.errors import StemmaError, UnsafeArtifactError
from stemma.update import bundle, keys, service
from stemma.update.local import LocalTrainConfig, make_update

from ..conftest import CORPUS, write_subset

FAST = LocalTrainConfig(steps=8, batch_size=4, warmup=2, lr=3e-3)


def _contributors(ws, tmp_path: Path, node: str, n: int) -> list[tuple[str, Path]]:
    out = []
    for i in range(n):
        k = tmp_path / f"key{node.replace('/', '_')}{i}"
        pub = keys.generate(k)
        service.register_contributor(ws, node, f"site-{i}", pub)
        out.append((f"site-{i}", k))
    return out


def _local_data(tmp_path: Path, i: int) -> Path:
    src = CORPUS / "en-manpages.jsonl"  # the tiny tree trains on the first 30 pages; these are new to it
    lines = src.read_text().splitlines()[60 + 12 * i: 60 + 12 * (i + 1)]
    p = tmp_path / f"local{i}.jsonl"
    p.write_text("\n".join(json.dumps({"text": json.loads(x)["text"][:2000]}) for x in lines) + "\n")
    return p


def _set_gate(tree, node: str, gate: dict, **node_fields) -> None:
    spec = yaml.safe_load(tree["spec"].read_text())
    spec["nodes"][node]["gate"] = gate
    spec["nodes"][node].update(node_fields)
    tree["spec"].write_text(yaml.safe_dump(spec, sort_keys=False))
    from stemma.build import build
    from stemma.spec import load_spec

    build(tree["ws"], load_spec(tree["spec"]))


def _make(ws, tmp_path, node, who, i, cfg=FAST) -> Path:
    name, key = who
    out = tmp_path / f"{name}-{node.replace('/', '_')}-{i}.update"
    make_update(ws, node, _local_data(tmp_path, i), key, name, out, cfg)
    return out


def _blob_count(home: Path) -> int:
    return sum(1 for p in (home / "store").rglob("*") if p.is_file())


def test_signed_update_round_trip_and_refusals(tree_copy, tmp_path):
    ws = tree_copy["ws"]
    node = "en/software"
    (who,) = _contributors(ws, tmp_path, node, 1)
    path = _make(ws, tmp_path, node, who, 0)
    upd = bundle.read(path)
    assert upd.header["node"] == node and upd.header["kind"] == "lora"
    assert upd.heldout is not None and upd.heldout.numel() > 10
    assert all(k.endswith(".weight") for k in upd.delta)

    before_blobs = _blob_count(tree_copy["home"])
    target = ws.resolve_version(node)
    stranger = tmp_path / "stranger"
    keys.generate(stranger)

    def forged(**changes):
        header = {**upd.header, **changes.pop("header", {})}
        delta = changes.pop("delta", upd.delta)
        key = changes.pop("key", keys.load_private(who[1]))
        return bundle.encode(header, delta, upd.heldout, key)

    other_tok = "0" * 64
    some_key = next(iter(upd.delta))
    bad = {
        "not signed": bundle.encode(upd.header, upd.delta, upd.heldout, None),
        "does not verify": forged(key=keys.load_private(stranger)),
        "not registered": forged(header={"contributor": "mallory"}),
        "not in the registry": forged(header={"parent": "f" * 64}),
        "tokenizer": forged(header={"tokenizer": other_tok}),
        "shape": forged(delta={**upd.delta, some_key: torch.zeros(3, 3)}),
        "does not have": forged(delta={"no.such.weight": torch.zeros(2)}),
    }
    # A signature over other tensors than the file holds: flip one value after signing.
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    bad["does not verify "] = bytes(raw)
    for why, data in bad.items():
        with pytest.raises(StemmaError, match=why.strip()):
            service.submit(ws, data, why)
    assert _blob_count(tree_copy["home"]) == before_blobs, "a refused update left a blob behind"
    assert service.updates(ws, node) == []

    row = service.submit(ws, path.read_bytes(), str(path))
    assert row.parent_id == target.id and row.status == "pending"
    scan = row.header["received"]["scan"]
    assert scan["scanner"] == "modelscan" and scan["files"] == ["update.safetensors"] and scan["issues"] == []
    assert row.header["received"]["digest"] == upd.digest.hex()
    stored = _blob_count(tree_copy["home"])
    with pytest.raises(StemmaError, match=r"replay: this file was already submitted .*\(waiting for a round\)"):
        service.submit(ws, path.read_bytes(), str(path))
    # The same signed content in another container (the safetensors header padded): still a replay.
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    repacked = (n + 8).to_bytes(8, "little") + raw[8:8 + n] + b" " * 8 + raw[8 + n:]
    assert bundle.decode(repacked).digest == upd.digest and bundle.decode(repacked).id != upd.id
    with pytest.raises(StemmaError, match="replay: its signed content was already submitted"):
        service.submit(ws, repacked, "repacked")
    # A second registered contributor sends the same delta under its own name and key: colluding copies.
    sybil = tmp_path / "sybil"
    service.register_contributor(ws, node, "sybil", keys.generate(sybil))
    copy = bundle.encode({**upd.header, "contributor": "sybil"}, upd.delta, upd.heldout, keys.load_private(sybil))
    with pytest.raises(StemmaError, match="sybil's delta is identical to update .* from site-0 .*colluding"):
        service.submit(ws, copy, "copy")
    assert _blob_count(tree_copy["home"]) == stored and len(service.updates(ws, node)) == 1
    assert ws.fsck().clean


class _System:
    """Unpickling this runs a shell command. It is only ever written here, never loaded."""

    def __reduce__(self):
        import os

        return (os.system, ("echo owned > /tmp/stemma-owned",))


def test_pickled_update_is_refused_with_the_scanners_finding(tree_copy, tmp_path):
    import io
    import pickle

    ws = tree_copy["ws"]
    before = _blob_count(tree_copy["home"])
    bare = pickle.dumps({"delta": _System()}, protocol=4)
    archive = io.BytesIO()
    torch.save({"delta": _System()}, archive)  # PyTorch's zip format, its pickle inside
    harmless = pickle.dumps({"delta": [0.0, 1.0]})
    for raw, msg in [(bare, r"update.pkl imports posix.system \(CRITICAL\)"),
                     (archive.getvalue(), r"update.pt:\S*data.pkl imports posix.system \(CRITICAL\)"),
                     (harmless, "update.pkl is pickle-based")]:
        with pytest.raises(UnsafeArtifactError, match=msg) as e:
            service.submit(ws, raw, "sent.update")
        assert "\n" not in str(e.value) and str(e.value).startswith("sent.update: ") and "modelscan" in str(e.value)
    assert _blob_count(tree_copy["home"]) == before and service.updates(ws, "en/software") == []


def test_round_rejected_without_enough_contributors_is_kept_with_reasons(tree_copy, tmp_path):
    ws = tree_copy["ws"]
    node = "en/legal"
    _set_gate(tree_copy, node, {"min_contributors": 3})
    (who,) = _contributors(ws, tmp_path, node, 1)
    service.submit(ws, _make(ws, tmp_path, node, who, 0).read_bytes())
    before = ws.resolve_version(node).id
    res = service.aggregate(ws, node)
    assert not res.round.accepted and res.version is None
    assert any("the gate needs 3" in r for r in res.round.reasons)
    assert ws.resolve_version(node).id == before
    assert [r.id for r in service.rounds(ws, node)] == [res.round.id]
    assert ws.fsck().clean


def test_accepted_round_makes_update_version_and_marks_descendants_stale(tree_copy, tmp_path):
    from stemma.build import build
    from stemma.lineage import tree_rows
    from stemma.spec import load_spec

    ws = tree_copy["ws"]
    node = "en/software"
    _set_gate(tree_copy, node, {"strategy": "fedavg", "min_contributors": 3, "max_own_rise": 0.5,
                                "max_child_rise": 0.5})
    _set_gate(tree_copy, "en/software/python", {}, on_parent_update="rebase", rebase={"steps_fraction": 0.25})
    whos = _contributors(ws, tmp_path, node, 3)
    for i, who in enumerate(whos):
        service.submit(ws, _make(ws, tmp_path, node, who, i).read_bytes())
    old = ws.resolve_version(node)
    child_before = ws.resolve_version("en/software/python")
    res = service.aggregate(ws, node)
    assert res.round.accepted, res.round.reasons
    new = res.version
    assert new.row.relation == "update" and new.row.parent_id == old.id
    assert ws.resolve_version(node).id == new.id
    m = res.round.metrics
    assert m["heldout_ppl"]["after"] < m["heldout_ppl"]["before"]
    assert "en/software/python" in m["children_ppl"]
    # The stored adapter is the old one with the aggregate's ranks stacked on.
    assert new.manifest["architecture"]["adapter"]["r"] > old.manifest["architecture"]["adapter"]["r"]
    ids = torch.arange(20)[None]
    a = ws.load_model(new.id)(input_ids=ids).logits
    b = ws.load_model(old.id)(input_ids=ids).logits
    assert not torch.allclose(a, b)
    rows = {r.path: r for r in tree_rows(ws)}
    assert rows["en/software/python"].status == "stale"
    assert rows[node].status == "ok" and rows["en"].status == "ok"
    # Build keeps the accepted update and rebases the stale adapter child; a second build does nothing.
    events = {e.node: e.action for e in build(ws, load_spec(tree_copy["spec"]))}
    assert events[node] == "reused (updated)"
    assert events["en/software/python"] == "rebased"
    child = ws.resolve_version("en/software/python")
    assert child.row.parent_id == new.id and child.manifest["train"]["rebased_from"] == child_before.id
    assert child.manifest["train"]["steps"] == round(child_before.manifest["train"]["steps"] * 0.25)
    assert all(r.status == "ok" for r in tree_rows(ws))
    again = {e.node: e.action for e in build(ws, load_spec(tree_copy["spec"]))}
    assert again["en/software/python"] == "reused"
    assert ws.fsck().clean
    # The rebase started from the old child's weights: a flag on the old child reaches the rebased one too.
    from stemma import risk

    assert child.row.derived_from == child_before.id
    flag = risk.flag(ws, f"version:en/software/python@{child_before.id[:12]}", reason="backdoor", severity="high")
    assert [f.id for f in risk.flags_reaching(ws, child.id)] == [flag.id]
    risk.unflag(ws, f"#{flag.id}", reason="checked")
    # Offered across to the sibling en/legal (a full-weight finetune of the same parent), under its gate.
    _set_gate(tree_copy, "en/legal", {"min_contributors": 1, "max_own_rise": 0.5, "max_child_rise": 0.5})
    off = service.offer(ws, res.round.id[:12], "en/legal")
    assert off.round.source_round == res.round.id
    if off.round.accepted:
        assert ws.resolve_version("en/legal").row.relation == "update"
    with pytest.raises(StemmaError, match="not a sibling"):
        service.offer(ws, res.round.id, "en/software/python")


def test_full_update_on_full_weight_node(tree_copy, tmp_path):
    ws = tree_copy["ws"]
    node = "en/legal"
    _set_gate(tree_copy, node, {"strategy": "median", "min_contributors": 2, "max_own_rise": 1.0,
                                "max_child_rise": 1.0})
    whos = _contributors(ws, tmp_path, node, 2)
    cfg = LocalTrainConfig(kind="full", steps=6, batch_size=4, warmup=2, lr=1e-3)
    for i, who in enumerate(whos):
        service.submit(ws, _make(ws, tmp_path, node, who, i, cfg).read_bytes())
    res = service.aggregate(ws, node)
    assert res.round.strategy == "median"
    assert len(res.round.selected) == 2
    if res.round.accepted:
        assert "model.safetensors" in res.version.manifest["files"]


def test_stale_updates_against_older_versions_are_not_aggregated(tree_copy, tmp_path):
    ws = tree_copy["ws"]
    node = "en/legal"
    whos = _contributors(ws, tmp_path, node, 1)
    service.submit(ws, _make(ws, tmp_path, node, whos[0], 0).read_bytes())
    late = _make(ws, tmp_path, node, whos[0], 1)
    # The node moves on (a rebuild with another config) before anyone aggregates.
    spec = yaml.safe_load(tree_copy["spec"].read_text())
    spec["nodes"][node]["config"]["steps"] = 12
    tree_copy["spec"].write_text(yaml.safe_dump(spec, sort_keys=False))
    from stemma.build import build
    from stemma.spec import load_spec

    build(ws, load_spec(tree_copy["spec"]))
    with pytest.raises(StemmaError, match="no pending updates against its current version"):
        service.aggregate(ws, node)
    # Made against the version the node has moved past, submitted now: refused, nothing stored.
    with pytest.raises(StemmaError, match=f"but {node} has moved on to .*train it again"):
        service.submit(ws, late.read_bytes(), str(late))
    assert len(service.updates(ws, node)) == 1


def test_revoked_key_is_refused_and_its_pending_updates_are_left_out(tree_copy, tmp_path):
    ws = tree_copy["ws"]
    node = "en/legal"
    _set_gate(tree_copy, node, {"strategy": "fedavg", "min_contributors": 1, "max_own_rise": 1.0,
                                "max_child_rise": 1.0})
    good, bad = _contributors(ws, tmp_path, node, 2)
    kept = service.submit(ws, _make(ws, tmp_path, node, good, 0).read_bytes())
    pending = service.submit(ws, _make(ws, tmp_path, node, bad, 1).read_bytes())
    later = _make(ws, tmp_path, node, bad, 2)
    row = service.revoke(ws, node, bad[0], "key found in a public repository", by="ops")
    assert row.revoked_at is not None and row.revoked_by == "ops"
    assert {u.id: u.status for u in service.updates(ws, node)} == {kept.id: "pending", pending.id: "revoked"}
    with pytest.raises(StemmaError, match="already revoked .* by ops"):
        service.revoke(ws, node, bad[0], "again")
    with pytest.raises(StemmaError, match="not a contributor"):
        service.revoke(ws, node, "nobody", "why")
    before = _blob_count(tree_copy["home"])
    with pytest.raises(StemmaError, match=f"{bad[0]}'s key for {node} was revoked .* by ops \\(key found in a "
                                          "public repository\\); refused"):
        service.submit(ws, later.read_bytes(), str(later))
    assert _blob_count(tree_copy["home"]) == before
    with pytest.raises(StemmaError, match="revoked"):
        service.register_contributor(ws, node, bad[0], Path(f"{bad[1]}.pub").read_text())
    with pytest.raises(StemmaError, match="that key was revoked"):
        service.register_contributor(ws, node, "new-name", Path(f"{bad[1]}.pub").read_text())
    # A submission that raced the revocation (its key checked just before) is still stored as pending: the round
    # leaves it out and says why.
    from stemma.registry.tables import Update

    with ws.db.session() as s:
        s.get(Update, pending.id).status = "pending"
    res = service.aggregate(ws, node)
    assert res.round.update_ids == [kept.id]
    left_out = f"left out update {pending.id[:12]}: {bad[0]}'s key was revoked"
    assert any(r.startswith(left_out) for r in res.round.reasons), res.round.reasons
    status = {u.id: (u.status, u.round_id) for u in service.updates(ws, node)}
    assert status[pending.id] == ("excluded", res.round.id) and status[kept.id] == ("used", res.round.id)
    listed = {c.name: c for c in service.contributors(ws, node)}
    assert listed[bad[0]].revoked_reason == "key found in a public repository" and listed[good[0]].revoked_at is None


def test_revocation_racing_a_submission_refuses_it(tree_copy, tmp_path, monkeypatch):
    """A key revoked after `submit` verified it, before it stored the update: the update is refused in the storing
    transaction, and neither a pending row nor its blob is left."""
    ws = tree_copy["ws"]
    node = "en/legal"
    (name, key), = _contributors(ws, tmp_path, node, 1)
    raw = _make(ws, tmp_path, node, (name, key), 0).read_bytes()
    real = service.verify

    def verify_then_revoked(ws_, upd):
        got = real(ws_, upd)
        service.revoke(ws_, node, name, "revoked while its update was in flight", by="ops")
        return got

    monkeypatch.setattr(service, "verify", verify_then_revoked)
    before = _blob_count(tree_copy["home"])
    with pytest.raises(StemmaError, match=f"{name}'s key for {node} was revoked .* by ops .*; refused"):
        service.submit(ws, raw)
    assert service.updates(ws, node) == [] and _blob_count(tree_copy["home"]) == before


def test_spec_rejects_bad_gate_and_rebase(tmp_path):
    from stemma.errors import SpecError
    from stemma.spec import parse_spec

    write_subset(CORPUS / "en-python.jsonl", tmp_path / "c.jsonl", 3)
    base = {"datasets": {"d": {"paths": ["c.jsonl"]}},
            "nodes": {"master": {"method": "pretrain", "dataset": "d"},
                      "en": {"method": "lora", "dataset": "d"}}}

    def with_node(**f):
        d = json.loads(json.dumps(base))
        d["nodes"]["en"].update(f)
        return d

    for fields, msg in [({"gate": {"strategy": "nope"}}, "unknown"), ({"gate": {"min_contributors": 0}}, ">= 1"),
                        ({"gate": {"bogus": 1}}, "unknown gate field"),
                        ({"on_parent_update": "sometimes"}, "retrain or rebase"),
                        ({"rebase": {"steps_fraction": 0.5}}, "on_parent_update is not rebase"),
                        ({"on_parent_update": "rebase", "rebase": {"steps_fraction": 2}}, "steps_fraction")]:
        with pytest.raises(SpecError, match=msg):
            parse_spec(with_node(**fields), tmp_path)
    d = json.loads(json.dumps(base))
    d["nodes"]["master"]["on_parent_update"] = "rebase"
    with pytest.raises(SpecError, match="only adapter children"):
        parse_spec(d, tmp_path)
