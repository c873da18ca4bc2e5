"""The command line: the golden path, and bad input giving one-line errors that change nothing."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from sqlalchemy import select

from stemma import cli
from stemma.registry import tables


def run(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["stemma", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(ws):
    rows = {}
    with ws.db.session() as s:
        for t in (tables.Dataset, tables.Node, tables.Version, tables.VersionDataset, tables.Metric):
            rows[t.__tablename__] = sorted(
                tuple(str(getattr(r, c.key)) for c in t.__table__.columns) for r in s.scalars(select(t)))
    return rows, sorted(ws.store.iter_digests())


def test_golden_path(tree_copy, capsys, monkeypatch, tmp_path):
    code, out, _ = run(capsys, monkeypatch, "tree")
    assert code == 0 and "python" in out and "adapter" in out  # each node's own name, under its parent
    code, out, _ = run(capsys, monkeypatch, "tree", "--json")
    assert code == 0 and "en/software/python" in {r["node"] for r in json.loads(out)["rows"]}
    code, out, _ = run(capsys, monkeypatch, "show", "en/software/python")
    doc = json.loads(out)
    assert doc["manifest"]["relation"] == "adapter" and doc["datasets"]["train"]["name"] == "en-python"
    assert "perplexity" in {m["name"] for m in doc["metrics"]}
    code, out, _ = run(capsys, monkeypatch, "lineage", "en/software/python")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 4 and lines[0].startswith("master")
    code, out, _ = run(capsys, monkeypatch, "data", "list")
    assert code == 0 and "en-legal" in out
    code, out, _ = run(capsys, monkeypatch, "export", "en/software/python", "--out", tmp_path / "x")
    assert code == 0 and (tmp_path / "x" / "model.safetensors").exists()
    code, out, _ = run(capsys, monkeypatch, "fsck")
    assert code == 0 and "0 corrupt, 0 missing, 0 orphan" in out


def test_tree_json_has_every_row_and_column(tree_copy, capsys, monkeypatch):
    ws = tree_copy["ws"]
    code, out, _ = run(capsys, monkeypatch, "tree", "--json")
    assert code == 0
    doc = json.loads(out)  # one document, nothing else on stdout
    rows = {r["node"]: r for r in doc["rows"]}
    assert set(rows) == {n.path for n in ws.nodes()}
    py = rows["en/software/python"]
    assert (py["parent"], py["layer"], py["relation"], py["status"]) == ("en/software", "subdomain", "adapter", "ok")
    assert py["version"] == ws.resolve_version("en/software/python").id and py["depth"] == 3
    assert {"params", "own_params", "bytes", "perplexity", "gain", "forgetting", "flags", "flag_mark",
            "licence"} <= set(py)
    v = ws.resolve_version("en/software/python")
    own = ws.version_datasets(v.id)["train"]
    assert py["perplexity"]["own_split"] == ws.get_metric(v.id, "perplexity", own, "test")
    assert py["gain"] == py["perplexity"]["own_split"] / py["perplexity"]["parent_on_own_split"] - 1
    assert isinstance(py["licence"]["summary"], str) and rows["master"]["parent"] is None
    assert run(capsys, monkeypatch, "flag", "version:en/software", "--reason", "backdoor",
               "--severity", "high")[0] == 0
    code, out, _ = run(capsys, monkeypatch, "tree", "--json", "--metric", "accuracy")
    rows = {r["node"]: r for r in json.loads(out)["rows"]}
    assert [f["id"] for f in rows["en/software/python"]["flags"]] == [1]
    assert rows["en/software/python"]["flag_mark"] == "affected" and rows["en/software"]["flag_mark"] == "flagged"
    assert rows["en"]["metric"] == {"name": "accuracy", "own_tasks": [], "parent_tasks": []}


@pytest.mark.parametrize("width", [200, 50])
def test_tree_names_nodes_under_their_parents_whole(tree_copy, capsys, monkeypatch, width):
    from stemma.cli.console import out as console

    monkeypatch.setattr(console, "width", width)
    code, out, _ = run(capsys, monkeypatch, "tree")
    assert code == 0
    names = [line.split("│")[1].rstrip() for line in out.splitlines()
             if line.count("│") > 3 and line.split("│")[1].strip()]
    names = [n for n in names if n.strip() not in ("node", "")]
    assert names[:5] == [" master", "   en", "     legal", "     software", "       python"], names
    assert "…" not in out.split("│")[1] and "en/software/python" not in out


def test_ingest_from_the_command_line(home, capsys, monkeypatch, tmp_path):
    assert run(capsys, monkeypatch, "init")[0] == 0
    (tmp_path / "d").mkdir()
    for i in range(5):
        (tmp_path / "d" / f"{i}.txt").write_text(f"document {i}\n\nsecond paragraph {i}")
    code, out, _ = run(capsys, monkeypatch, "data", "ingest", tmp_path / "d", "--name", "en-software",
                       "--license", "MIT", "--language", "en")
    assert code == 0 and "5 of 5 documents" in out and "ingested" in out
    code, out, _ = run(capsys, monkeypatch, "data", "show", "en-software", "--json")
    sheet = json.loads(out)["datasheet"]
    assert sheet["license"] == "MIT" and sheet["language"] == "en" and sheet["counts"]["documents"] == 5


def _bad_spec(kind, d):
    spec = yaml.safe_load((d / "stemma.yaml").read_text())
    if kind == "cycle":
        spec["nodes"]["en"]["parent"] = "en/software/python"
    elif kind == "unknown-parent":
        spec["nodes"]["en/legal"]["parent"] = "fr"
    elif kind == "bad-name":
        spec["nodes"]["../x"] = {"method": "lora", "dataset": "en", "parent": "en"}
    elif kind == "missing-file":
        spec["datasets"]["en"]["paths"].append("corpus/nope.jsonl")
    elif kind == "empty-corpus":
        (d / "corpus" / "empty.txt").write_text("\n\n")
        spec["datasets"]["empty"] = {"paths": ["corpus/empty.txt"]}
        spec["nodes"]["en/empty"] = {"method": "lora", "dataset": "empty"}
    elif kind == "pickle":
        ck = d / "ckpt"
        ck.mkdir()
        (ck / "config.json").write_text("{}")
        (ck / "pytorch_model.bin").write_bytes(b"\x80\x04")
        spec["nodes"]["other"] = {"method": "import", "config": {"path": "ckpt"}}
    p = d / f"{kind}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


@pytest.mark.parametrize("kind", ["cycle", "unknown-parent", "bad-name", "missing-file", "empty-corpus", "pickle"])
def test_bad_spec_is_one_line_error_and_changes_nothing(tree_copy, capsys, monkeypatch, kind):
    ws = tree_copy["ws"]
    before = snapshot(ws)
    spec = _bad_spec(kind, tree_copy["dir"])
    code, out, err = run(capsys, monkeypatch, "build", spec)
    assert code != 0
    assert err.strip().startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert snapshot(ws) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["data", "ingest", "/nonexistent/file.txt", "--name", "x"], "no such file"),
        (["show", "nope"], "unknown node"),
        (["lineage", "../x"], "unknown node"),
        (["export", "nope", "--out", "/tmp/never"], "unknown node"),
        (["build", "/nonexistent/stemma.yaml"], "no such file"),
    ],
)
def test_bad_arguments_are_one_line_errors(tree_copy, capsys, monkeypatch, args, message):
    before = snapshot(tree_copy["ws"])
    code, out, err = run(capsys, monkeypatch, *args)
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(tree_copy["ws"]) == before


def test_corrupted_blob_is_reported(tree_copy, capsys, monkeypatch, tmp_path):
    ws = tree_copy["ws"]
    v = ws.resolve_version("en")
    blob = ws.store.path(v.manifest["files"]["model.safetensors"])
    blob.write_bytes(b"garbage")
    code, out, err = run(capsys, monkeypatch, "export", "en/software", "--out", tmp_path / "o")
    assert code != 0 and "corrupt" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run(capsys, monkeypatch, "fsck")
    assert code == 1 and "corrupt" in out and "1 corrupt" in out


def test_commands_need_an_initialised_home(home, capsys, monkeypatch):
    code, _, err = run(capsys, monkeypatch, "tree")
    assert code != 0 and "stemma init" in err
