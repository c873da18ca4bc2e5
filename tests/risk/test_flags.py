"""Risk flags: what a flag reaches equals a walk of the lineage; flags are cleared, never deleted."""

from __future__ import annotations

import pytest

from stemma import risk
from stemma.errors import StemmaError
from stemma.registry.tables import Flag, Version, VersionDataset


def _walk(ws, seeds: set[str]) -> set[str]:
    """Descendants by a plain Python walk over every version's parent (the reference for the recursive query)."""
    with ws.db.session() as s:
        parent = {v.id: v.parent_id for v in s.query(Version)}
    out = set(seeds)
    changed = True
    while changed:
        changed = False
        for vid, pid in parent.items():
            if pid in out and vid not in out:
                out.add(vid)
                changed = True
    return out


def _trained_on(ws, dataset_id: str) -> set[str]:
    with ws.db.session() as s:
        return {r.version_id for r in s.query(VersionDataset).filter(VersionDataset.dataset_id == dataset_id)}


@pytest.mark.parametrize("dataset", ["en-software", "en", "all"])
def test_impact_of_a_dataset_is_every_version_trained_on_it_and_their_descendants(registry_tree, dataset):
    ws = registry_tree["ws"]
    ds = ws.resolve_dataset(dataset)
    target, reached = risk.impact(ws, f"dataset:{dataset}")
    assert target.id == ds.id
    expected = _walk(ws, _trained_on(ws, ds.id))
    assert expected, "the tree trains on every declared dataset"
    assert {a.version_id for a in reached} == expected
    assert len(reached) == len(expected)  # each version once


def test_a_flagged_version_reaches_its_subtree_only(registry_tree):
    ws = registry_tree["ws"]
    sw = ws.resolve_version("en/software")
    info = risk.flag(ws, "en/software", reason="backdoor found", severity="critical", by="alice")
    reached = risk.affected(ws)
    assert set(reached) == _walk(ws, {sw.id})
    nodes = {ws.version(v).row.node_path for v in reached}
    assert nodes == {"en/software", "en/software/python"}
    assert all(f.id == info.id for fs in reached.values() for f in fs)
    assert risk.flags_reaching(ws, ws.resolve_version("en/legal").id) == []


def test_unflag_clears_and_keeps_the_record(registry_tree):
    ws = registry_tree["ws"]
    first = risk.flag(ws, "dataset:en-python", reason="poisoned", severity="high", by="alice")
    assert risk.affected(ws)
    cleared = risk.unflag(ws, f"#{first.id}", reason="false alarm", by="bob")
    assert [c.id for c in cleared] == [first.id] and cleared[0].cleared_by == "bob"
    assert risk.affected(ws) == {}
    history = risk.flags(ws, include_cleared=True)
    assert [(f.id, f.created_by, f.cleared_by, f.cleared_reason) for f in history] == [
        (first.id, "alice", "bob", "false alarm")]
    with pytest.raises(StemmaError, match="no active flag"):
        risk.unflag(ws, "dataset:en-python", reason="again")


def test_bad_flags_are_refused_and_store_nothing(registry_tree):
    ws = registry_tree["ws"]
    with pytest.raises(StemmaError, match="severity"):
        risk.flag(ws, "en", reason="x", severity="medium")
    with pytest.raises(StemmaError, match="reason"):
        risk.flag(ws, "en", reason="  ", severity="low")
    with pytest.raises(StemmaError, match="at most 2000"):  # PostgreSQL would refuse it; SQLite would not
        risk.flag(ws, "version:en", reason="x" * 2001, severity="low")
    with pytest.raises(StemmaError, match="names no dataset"):
        risk.flag(ws, "no-such-thing", reason="x", severity="low")
    # `en` is both a dataset and a node of the tiny tree
    with pytest.raises(StemmaError, match="dataset:en or version:en"):
        risk.flag(ws, "en", reason="x", severity="low")
    with ws.db.session() as s:
        assert s.query(Flag).count() == 0


def test_a_flag_number_with_a_hash_is_a_flag_whatever_its_digits(tree_copy):
    ws = tree_copy["ws"]
    with ws.db.session() as s:
        s.add(Flag(id=1000, target_kind="dataset", target_id=ws.resolve_dataset("en-python").id, severity="low",
                   reason="r", created_by="alice"))
    [cleared] = risk.unflag(ws, "#1000", reason="checked", by="bob")
    assert cleared.id == 1000 and cleared.cleared_by == "bob"
