"""`stemma update ...` from the command line: the golden path, and bad input as one-line errors that store
nothing."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from stemma.registry import tables

from ..test_cli import run
from .test_updates import _local_data, _set_gate


def _state(ws):
    with ws.db.session() as s:
        rows = {t.__tablename__: len(list(s.scalars(select(t))))
                for t in (tables.Contributor, tables.Update, tables.Round, tables.Version)}
    return rows, sorted(ws.store.iter_digests())


def test_update_cli_golden_path_and_errors(tree_copy, capsys, monkeypatch, tmp_path):
    ws = tree_copy["ws"]
    node = "en/legal"
    _set_gate(tree_copy, node, {"strategy": "trimmed_mean", "strategy_config": {"trim": 0.0},
                                "min_contributors": 2, "max_own_rise": 1.0, "max_child_rise": 1.0})
    for i in range(2):
        code, out, err = run(capsys, monkeypatch, "update", "keygen", tmp_path / f"k{i}")
        assert code == 0, err
        assert (tmp_path / f"k{i}").stat().st_mode & 0o777 == 0o600
        code, out, err = run(capsys, monkeypatch, "update", "register", node, "--name", f"site-{i}",
                             "--public-key", tmp_path / f"k{i}.pub")
        assert code == 0 and f"site-{i} may update {node}" in out, err
        code, out, err = run(capsys, monkeypatch, "update", "train", node, "--data", _local_data(tmp_path, i),
                             "--key", tmp_path / f"k{i}", "--contributor", f"site-{i}", "--out",
                             tmp_path / f"u{i}.update", "--steps", "6")
        assert code == 0 and "wrote" in out, err
    code, out, err = run(capsys, monkeypatch, "update", "contributors", node)
    assert code == 0 and "site-0" in out and "site-1" in out

    before = _state(ws)
    bad = [
        (("update", "keygen", tmp_path / "k0"), "refusing to overwrite"),
        (("update", "register", "nope/node", "--name", "x", "--public-key", "00" * 32), "unknown node"),
        (("update", "register", node, "--name", "x", "--public-key", "abc"), "64 hex characters"),
        (("update", "submit", tmp_path / "missing.update"), "no such file"),
        (("update", "submit", tmp_path / "k0.pub"), "not a safetensors file"),
        (("update", "train", node, "--data", tmp_path / "nope.jsonl", "--key", tmp_path / "k0", "--contributor",
          "site-0", "--out", tmp_path / "x.update"), "nope.jsonl"),
        (("update", "train", node, "--data", _local_data(tmp_path, 0), "--key", tmp_path / "k0.pub",
          "--contributor", "site-0", "--out", tmp_path / "x.update"), "PEM"),
        (("update", "train", node, "--data", _local_data(tmp_path, 0), "--key", tmp_path / "k0",
          "--contributor", "site-0", "--out", tmp_path / "no" / "dir" / "x.update"), "no such directory"),
        (("update", "aggregate", node), "no pending updates"),
        (("update", "aggregate", node, "--strategy", "nope"), "no pending updates"),
        (("update", "offer", "abc123", "--to", "en/software"), "unknown or ambiguous round"),
    ]
    for args, msg in bad:
        code, out, err = run(capsys, monkeypatch, *args)
        assert code == 1, (args, out, err)
        assert msg in err and len(err.strip().splitlines()) == 1, (args, err)
    assert _state(ws) == before
    assert not (tmp_path / "x.update").exists()

    code, out, err = run(capsys, monkeypatch, "update", "submit", tmp_path / "u0.update", tmp_path / "u1.update")
    assert code == 0 and out.count("accepted for aggregation") == 2, err
    code, out, err = run(capsys, monkeypatch, "update", "list", node)
    assert code == 0 and out.count("pending") == 2
    code, out, err = run(capsys, monkeypatch, "update", "aggregate", node, "--strategy", "nope")
    assert code == 1 and "unknown aggregation strategy" in err
    code, out, err = run(capsys, monkeypatch, "update", "aggregate", node)
    assert code in (0, 2), err
    assert "round" in out and ("accepted" in out or "rejected" in out)
    code, out, err = run(capsys, monkeypatch, "update", "rounds", node)
    assert code == 0 and "trimmed_mean" in out
    code, out, err = run(capsys, monkeypatch, "update", "submit", tmp_path / "u1.update")
    assert code == 1 and "replay: this file was already submitted" in err and "used in round" in err, err
    code, out, err = run(capsys, monkeypatch, "update", "revoke", "site-0", "--node", node, "--reason", "lost laptop")
    assert code == 0 and "revoked site-0's key" in out, err
    for args, msg in [(("update", "revoke", "site-0", "--node", node, "--reason", "again"), "already revoked"),
                      (("update", "revoke", "nobody", "--node", node, "--reason", "x"), "not a contributor")]:
        code, out, err = run(capsys, monkeypatch, *args)
        assert code == 1 and msg in err and len(err.strip().splitlines()) == 1, (args, err)
    code, out, err = run(capsys, monkeypatch, "update", "contributors", node)
    assert code == 0 and "revoked" in out and "lost" in out and "active" in out, out
    code, out, err = run(capsys, monkeypatch, "fsck")
    assert code == 0, out


@pytest.mark.parametrize("kind", ["bogus"])
def test_update_train_rejects_unknown_kind(tree_copy, capsys, monkeypatch, tmp_path, kind):
    code, out, err = run(capsys, monkeypatch, "update", "train", "en/legal", "--data", _local_data(tmp_path, 0),
                         "--key", tmp_path / "k", "--contributor", "x", "--out", tmp_path / "u", "--kind", kind)
    assert code == 1 and "--kind is lora or full" in err
