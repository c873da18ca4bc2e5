"""The registry on a real PostgreSQL server: a tree built into it, and writers in two processes at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from sqlalchemy import select

from stemma.registry.tables import Dataset, Flag, Metric, Node, Version
from tests.test_cli import run

ROOT = Path(__file__).resolve().parents[1]


def test_a_tree_built_into_postgresql_is_whole(pg_tree, built_tree, pg_tree_copy, capsys, monkeypatch):
    """`stemma build` with STEMMA_REGISTRY_URL on PostgreSQL: every node current, `tree` and `fsck` clean, and the
    same datasets and lineage as the same spec built into SQLite."""
    ws = pg_tree_copy["ws"]
    assert ws.db.engine.dialect.name == "postgresql"
    assert {e.node for e in pg_tree["events"]} == {e.node for e in built_tree["events"]}
    code, out, _ = run(capsys, monkeypatch, "tree", "--json")
    assert code == 0
    rows = {r["node"]: r for r in json.loads(out)["rows"]}
    assert set(rows) == {"master", "en", "en/software", "en/software/python", "en/legal"}
    assert all(r["status"] == "ok" and r["perplexity"]["own_split"] > 0 for r in rows.values())
    code, out, _ = run(capsys, monkeypatch, "fsck")
    assert code == 0 and "0 corrupt, 0 missing, 0 orphan" in out

    from stemma.workspace import Workspace

    monkeypatch.delenv("STEMMA_REGISTRY_URL")  # the SQLite build's own registry
    lite = Workspace.open(built_tree["home"])
    try:
        def shape(w):
            with w.db.session() as s:
                datasets = sorted((d.id, d.name, d.seq) for d in s.scalars(select(Dataset)))
                versions = {v.id: v for v in s.scalars(select(Version))}
                lineage = sorted((v.node_path, v.relation, v.method, versions[v.parent_id].node_path if v.parent_id
                                  else None) for v in versions.values())
                nodes = sorted((n.path, n.layer, n.parent_path) for n in s.scalars(select(Node)))
            return datasets, lineage, nodes

        assert shape(ws) == shape(lite)
    finally:
        lite.db.engine.dispose()


WORKER = r"""
import os, sys, time
from pathlib import Path

from stemma import risk
from stemma.data.ingest import BuiltDataset
from stemma.workspace import Workspace

tag, n, version, sync = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
ws = Workspace.open()
scratch = sync / tag
scratch.mkdir()


def dataset(name, text):
    train, test = scratch / "train.jsonl", scratch / "test.jsonl"
    train.write_text('{"text": "%s"}\n' % text)
    test.write_text('{"text": "test %s"}\n' % text)
    counts = {"documents": 2, "train_documents": 1, "test_documents": 1}
    manifest = {"name": name, "train": ws.store.put_file(train), "test": ws.store.put_file(test),
                "datasheet": {"language": "en", "license": "CC0-1.0", "counts": counts}}
    return BuiltDataset(manifest=manifest, train_path=train, test_path=test)


(sync / f"ready-{tag}").touch()
deadline = time.time() + 300
while len(list(sync.glob("ready-*"))) < 2:  # start together, so the two writers overlap
    if time.time() > deadline:
        sys.exit("the other writer never started")
    time.sleep(0.01)
for i in range(n):
    ws.register_dataset(dataset("shared", f"{tag} {i}"))  # one name: the two writers race for each seq
    ws.register_dataset(dataset(f"common-{i}", "same"))  # one content: the two writers race for one id
    ws.put_metric(version, f"m-{tag}-{i}", None, None, float(i), {"writer": tag})
    f = risk.flag(ws, "dataset:shared", reason=f"{tag} {i}", severity="low", by=tag)
    risk.unflag(ws, f"#{f.id}", reason=f"checked {tag} {i}", by=tag)
"""


def test_two_writers_at_once_lose_nothing(pg_tree_copy, tmp_path):
    """Two processes register datasets (under one name, and the same one), metrics and flags into one PostgreSQL
    registry at the same time: every row is there exactly once, dataset sequence numbers are 1..N without gaps."""
    ws = pg_tree_copy["ws"]
    version = ws.resolve_version("master").id
    n = 20
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, tag, str(n), version, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for tag in ("a", "b")]
    try:
        for p in procs:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    with ws.db.session() as s:
        shared = list(s.scalars(select(Dataset).where(Dataset.name == "shared")))
        assert sorted(d.seq for d in shared) == list(range(1, 2 * n + 1))
        assert sorted(d.datasheet["counts"]["documents"] for d in shared) == [2] * (2 * n)
        common = Counter(d.name for d in s.scalars(select(Dataset).where(Dataset.name.startswith("common-"))))
        assert common == {f"common-{i}": 1 for i in range(n)}
        metrics = Counter(m.name for m in s.scalars(select(Metric).where(Metric.name.startswith("m-"))))
        assert metrics == {f"m-{t}-{i}": 1 for t in "ab" for i in range(n)}
        flags = list(s.scalars(select(Flag)))
        assert sorted(f.reason for f in flags) == sorted(f"{t} {i}" for t in "ab" for i in range(n))
        assert all(f.cleared_at is not None and f.cleared_by == f.created_by
                   and f.cleared_reason == f"checked {f.reason}" for f in flags)
