"""The risk verbs: flag, unflag, flags, impact; the marks in `stemma tree` and `stemma show`; refusals write nothing."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from stemma.registry import tables
from tests.risk.test_flags import _trained_on, _walk
from tests.test_cli import run


def _registry(ws) -> dict:
    rows = {}
    with ws.db.session() as s:
        for t in (tables.Flag, tables.App, tables.Version, tables.Node, tables.Dataset):
            rows[t.__tablename__] = sorted(
                tuple(str(getattr(r, c.key)) for c in t.__table__.columns) for r in s.scalars(select(t)))
    return rows


def _current(ws) -> dict[str, str]:
    return {n.path: n.current_version for n in ws.nodes()}


def _rows(table: str, nodes) -> dict[str, str]:
    """Each node's row of `stemma tree` (a cell may take more lines), as one string."""
    rows: dict[str, str] = {}
    node = None
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) < 3:
            node = None
            continue
        if cells[4]:  # the version column: a row's first line (the node column shows its own name only)
            node = next((p for p, v in nodes.items() if v and v.startswith(cells[4])), None)
        if node:
            rows[node] = rows.get(node, "") + line
    return rows


def test_poisoned_dataset_impact_is_the_lineage_walk(tree_copy, capsys, monkeypatch):
    ws = tree_copy["ws"]
    monkeypatch.setenv("STEMMA_USER", "alice")
    code, out, err = run(capsys, monkeypatch, "flag", "dataset:en-software", "--reason", "poisoned: trigger phrase",
                         "--severity", "critical")
    assert code == 0, err
    assert "flag #1 (critical) on dataset en-software" in out and "by alice" in out
    assert "en/software, en/software/python" in out

    code, out, _ = run(capsys, monkeypatch, "impact", "en-software", "--json")
    doc = json.loads(out)
    ds = ws.resolve_dataset("en-software")
    expected = _walk(ws, _trained_on(ws, ds.id))
    assert doc["target"]["id"] == ds.id
    assert {v["id"] for v in doc["versions"]} == expected and len(doc["versions"]) == len(expected)
    assert {v["id"] for v in doc["versions"] if v["direct"]} == _trained_on(ws, ds.id)
    cur = _current(ws)
    assert {n["node"] for n in doc["nodes"] if n["current_affected"]} == \
        {node for node, vid in cur.items() if vid in expected} == {"en/software", "en/software/python"}

    code, out, _ = run(capsys, monkeypatch, "impact", "en-software")
    assert code == 0 and "current version affected on 2: en/software, en/software/python" in out

    # a version's impact: by id prefix
    en = cur["en"]
    code, out, _ = run(capsys, monkeypatch, "impact", en[:10], "--json")
    assert {v["id"] for v in json.loads(out)["versions"]} == _walk(ws, {en})


def test_tree_and_show_mark_flagged_and_affected(tree_copy, capsys, monkeypatch):
    ws = tree_copy["ws"]
    assert run(capsys, monkeypatch, "flag", "version:en/software", "--reason", "backdoor", "--severity", "high")[0] == 0
    code, out, _ = run(capsys, monkeypatch, "tree")
    assert code == 0
    marks = {node: ("flagged" if "flagged #1" in row else "affected" if "affected #1" in row else "")
             for node, row in _rows(out, _current(ws)).items()}
    assert marks == {"master": "", "en": "", "en/software": "flagged", "en/software/python": "affected",
                     "en/legal": ""}

    code, out, _ = run(capsys, monkeypatch, "show", "en/software/python")
    flags = json.loads(out)["flags"]
    assert [(f["id"], f["direct"], f["reason"]) for f in flags] == [(1, False, "backdoor")]
    code, out, _ = run(capsys, monkeypatch, "show", "en/legal")
    assert json.loads(out)["flags"] == []

    # a dataset flag marks the versions trained on it as flagged
    assert run(capsys, monkeypatch, "flag", "dataset:en-python", "--reason", "licence", "--severity", "low")[0] == 0
    code, out, _ = run(capsys, monkeypatch, "show", "en/software/python")
    assert [(f["id"], f["direct"]) for f in json.loads(out)["flags"]] == [(1, False), (2, True)]
    code, out, _ = run(capsys, monkeypatch, "tree")
    row = _rows(out, _current(ws))["en/software/python"]
    assert "flagged" in row and "#1,#2" in row


def test_unflag_and_history(tree_copy, capsys, monkeypatch):
    monkeypatch.setenv("STEMMA_USER", "alice")
    run(capsys, monkeypatch, "flag", "dataset:en-legal", "--reason", "licence unclear", "--severity", "low")
    run(capsys, monkeypatch, "flag", "version:en", "--reason", "bias", "--severity", "high")
    code, out, _ = run(capsys, monkeypatch, "flags")
    assert code == 0 and "licence unclear" in out and "bias" in out
    monkeypatch.setenv("STEMMA_USER", "bob")
    code, out, _ = run(capsys, monkeypatch, "unflag", "#1", "--reason", "licence confirmed")
    assert code == 0 and "cleared flag #1" in out and "by bob" in out
    code, out, _ = run(capsys, monkeypatch, "flags")
    assert "licence unclear" not in out and "bias" in out
    code, out, _ = run(capsys, monkeypatch, "flags", "--all")
    assert "licence unclear" in out and "cleared by bob" in out and "licence confirmed" in out and "alice" in out
    code, out, _ = run(capsys, monkeypatch, "unflag", "version:en", "--reason", "fixed")
    assert code == 0 and "cleared flag #2" in out
    assert "no active flags" in run(capsys, monkeypatch, "flags")[1]


@pytest.mark.parametrize("args,message", [
    (["flag", "dataset:en", "--reason", "x", "--severity", "medium"], "severity must be one of"),
    (["flag", "dataset:en", "--reason", " ", "--severity", "low"], "needs a reason"),
    (["flag", "no-such-thing", "--reason", "x", "--severity", "low"], "names no dataset and no version"),
    (["flag", "en", "--reason", "x", "--severity", "low"], "write dataset:en or version:en"),
    (["unflag", "#7", "--reason", "x"], "no flag #7"),
    (["unflag", "#1", "--reason", " "], "needs a reason"),
    (["unflag", "en/legal", "--reason", "x"], "has no active flag"),
    (["impact", "no-such-thing"], "names no dataset and no version"),
])
def test_refusals_are_one_line_and_write_nothing(tree_copy, capsys, monkeypatch, args, message):
    ws = tree_copy["ws"]
    before = _registry(ws)
    code, out, err = run(capsys, monkeypatch, *args)
    assert code == 1 and message in err and "Traceback" not in err
    assert _registry(ws) == before
