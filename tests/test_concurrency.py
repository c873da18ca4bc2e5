"""Concurrent writers on one registry and one store lose nothing: `stemma build` processes building different
subtrees while readers check every published version, and contributors submitting updates to one node while another
process aggregates them. Every version, update and round is there exactly once, no node has two versions of one
recipe, no reader ever sees a half-published version, and `stemma fsck` is clean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from stemma.registry.tables import Round, Update, Version
from tests.test_cli import run

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Each process's stdout once it has exited 0 (its stderr in the failure otherwise); none is left running."""
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, f"{p.args[-3:]} failed:\n{err[-4000:]}"
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def _fsck_clean(capsys, monkeypatch) -> None:
    code, out, _ = run(capsys, monkeypatch, "fsck")
    assert code == 0 and "0 corrupt, 0 missing, 0 orphan; registry: 0 inconsistent" in out, out


READER = r"""
import json, sys, time
from pathlib import Path

from stemma.errors import StemmaError
from stemma.registry.tables import Node, Version, VersionDataset
from stemma.store import sha256_file
from stemma.workspace import Workspace
from sqlalchemy import select

stop = Path(sys.argv[1])
ws = Workspace.open()
passes, seen, counts, problems = 0, set(), [], []


def whole(s, v) -> list[str]:
    # What a server reads of a version: its manifest, its files and tokenizer, its datasets.
    try:
        m = ws.store.get_json(v.id)
    except StemmaError as e:
        return [f"{v.id[:12]}: manifest: {e}"]
    out = []
    if (m["node"], m["recipe_key"], m.get("parent")) != (v.node_path, v.recipe_key, v.parent_id):
        out.append(f"{v.id[:12]}: the row and the manifest disagree")
    for digest in [m["tokenizer"], *m["files"].values()]:
        if digest not in verified:
            if not ws.store.has(digest) or sha256_file(ws.store.path(digest)) != digest:
                out.append(f"{v.id[:12]}: blob {digest[:12]} missing or corrupt")
            verified.add(digest)
    roles = {r.role: r.dataset_id for r in s.scalars(select(VersionDataset).where(VersionDataset.version_id == v.id))}
    if m["relation"] != "update" and roles != {k: d for k, d in (m["recipe"].get("datasets") or {}).items()}:
        out.append(f"{v.id[:12]}: datasets {roles} are not its recipe's")
    return out


verified = set()
while True:
    last = stop.exists()  # one full pass after the builds ended: it sees every version
    with ws.db.session() as s:
        # Nodes before versions: each statement reads its own snapshot (PostgreSQL's READ COMMITTED), and a version
        # a node points to was committed with or before that node row, so the later read sees it.
        nodes = list(s.scalars(select(Node)))
        versions = {v.id: v for v in s.scalars(select(Version))}
        for n in nodes:
            if n.current_version and n.current_version not in versions:
                problems.append(f"{n.path}: current version {n.current_version[:12]} is not registered")
        for v in versions.values():
            if v.id not in seen:
                problems += whole(s, v)
                seen.add(v.id)
    passes += 1
    counts.append(len(versions))
    if last:
        break
    time.sleep(0.05)
print(json.dumps({"passes": passes, "first": counts[0], "last": counts[-1], "seen": sorted(seen),
                  "problems": problems}))
"""


def _add_subtrees(spec_path: Path) -> None:
    """A new domain node ``en/shared`` (both builders need it) and a leaf under it for each builder."""
    spec = yaml.safe_load(spec_path.read_text())
    fast = {"steps": 6, "batch_size": 4, "warmup": 1}
    spec["nodes"]["en/shared"] = {"method": "lora", "dataset": "en-software", "config": dict(fast)}
    spec["nodes"]["en/shared/a"] = {"method": "lora", "dataset": "en-python", "config": {**fast, "steps": 12}}
    spec["nodes"]["en/shared/b"] = {"method": "finetune", "dataset": "en-legal", "config": {**fast, "steps": 12}}
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))


def _events(stdout: str) -> dict[str, str]:
    """``stemma build``'s summary lines: node -> action."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] in ("built", "reused", "rebased") and parts[3].endswith("s"):
            out[parts[1]] = parts[0]
    return out


@pytest.mark.timeout(400)
def test_two_builds_of_different_subtrees_and_two_readers(pg_tree_copy, tmp_path, capsys, monkeypatch):
    """Two `stemma build --node` processes share a new node and each has a new leaf: the shared node is built once
    (the other builder finds it by its recipe key), both leaves are built; two readers checking every version as it
    appears never see one half-published."""
    ws, spec = pg_tree_copy["ws"], pg_tree_copy["spec"]
    _add_subtrees(spec)
    with ws.db.session() as s:
        before = {v.id for v in s.scalars(select(Version))}
    stop = tmp_path / "stop"
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(stop)], env=_env(), cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    builders = [subprocess.Popen([sys.executable, "-m", "stemma.cli", "build", str(spec), "--node", leaf,
                                  "--no-footprint", "--workers", "1"], env=_env(COLUMNS="200"), cwd=tmp_path,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for leaf in ("en/shared/a", "en/shared/b")]
    try:
        outs = _finish(builders, timeout=360)
    finally:
        stop.touch()
    views = [json.loads(out) for out in _finish(readers, timeout=60)]

    a, b = (_events(o) for o in outs)
    assert a["en/shared/a"] == "built" and b["en/shared/b"] == "built"
    assert sorted([a["en/shared"], b["en/shared"]]) == ["built", "reused"]
    for events in (a, b):
        assert all(events[n] == "reused" for n in ("master", "en"))

    with ws.db.session() as s:
        versions = list(s.scalars(select(Version)))
    new = [v for v in versions if v.id not in before]
    assert Counter(v.node_path for v in new) == {"en/shared": 1, "en/shared/a": 1, "en/shared/b": 1}
    assert len({(v.node_path, v.recipe_key) for v in versions}) == len(versions)
    for node in ("en/shared", "en/shared/a", "en/shared/b"):
        assert ws.node(node).current_version in {v.id for v in new if v.node_path == node}
    assert ws.locks.holders() == []

    for view in views:
        assert view["problems"] == []
        assert view["passes"] > 3 and view["first"] < view["last"] == len(versions)  # they read while it published
        assert set(view["seen"]) == {v.id for v in versions}
    _fsck_clean(capsys, monkeypatch)


SUBMITTER = r"""
import json, sys, time
import torch

from stemma.errors import StemmaError
from stemma.update import bundle, keys, service
from stemma.workspace import Workspace

node, template, name, key_path, n, index = sys.argv[1:7]
ws = Workspace.open()
tmpl = bundle.read(template)
key = keys.load_private(key_path)
ids, refused = [], 0
for i in range(int(n)):
    # Each update differs (no two deltas alike), against whatever version is current when it is made.
    scale = 1.0 + 0.01 * int(index) + 0.001 * i
    delta = {k: t * scale for k, t in tmpl.delta.items()}
    while True:
        parent = ws.resolve_version(node).id
        raw = bundle.encode({**tmpl.header, "parent": parent, "contributor": name}, delta, tmpl.heldout, key)
        try:
            ids.append(service.submit(ws, raw, f"{name}-{i}").id)
            break
        except StemmaError as e:  # a round moved the node meanwhile: train against the new version again
            if "current" not in str(e) and "made against" not in str(e):
                raise
            refused += 1
    time.sleep(0.3)
print(json.dumps({"ids": ids, "refused": refused}))
"""

AGGREGATOR = r"""
import json, sys, time
from pathlib import Path

from stemma.errors import StemmaError
from stemma.update import service
from stemma.workspace import Workspace

node, rounds, done = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
ws = Workspace.open()
out = []
while len(out) < rounds:
    finished = done.exists()
    try:
        r = service.aggregate(ws, node)
        out.append({"round": r.round.id, "accepted": r.round.accepted, "updates": r.round.update_ids,
                     "version": r.version.id if r.version else None})
    except StemmaError as e:
        if "no pending updates" not in str(e):
            raise
        if finished:
            break
        time.sleep(0.2)
print(json.dumps(out))
"""


@pytest.mark.timeout(400)
def test_four_submitters_and_an_aggregator_lose_no_update(pg_tree_copy, tmp_path, capsys, monkeypatch):
    """Four contributor processes submit updates to one node while a fifth aggregates rounds: every submitted update
    is registered once and is either in exactly one round or still pending; every round and its version once."""
    from stemma.update import keys, service
    from stemma.update.local import LocalTrainConfig, make_update
    from tests.update.test_updates import _local_data

    ws = pg_tree_copy["ws"]
    node = "en/software"
    # Any single contributor may move the node (so submitters race rounds that change its version), judged on a
    # small sample: the test is about the bookkeeping, not the gate.
    ws.set_gate(node, {"strategy": "fedavg", "min_contributors": 1, "max_own_rise": 1.0, "max_child_rise": 1.0,
                       "min_heldout_gain": -1.0, "eval_tokens": 512})
    people = []
    for i in range(4):
        k = tmp_path / f"key{i}"
        service.register_contributor(ws, node, f"site-{i}", keys.generate(k))
        people.append((f"site-{i}", k))
    template = tmp_path / "template.update"
    make_update(ws, node, _local_data(tmp_path, 0), people[0][1], people[0][0], template,
                LocalTrainConfig(steps=4, batch_size=4, warmup=1, lr=3e-3))
    done = tmp_path / "submitted"
    per = 2
    aggregator = subprocess.Popen([sys.executable, "-c", AGGREGATOR, node, "2", str(done)], env=_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    submitters = [subprocess.Popen([sys.executable, "-c", SUBMITTER, node, str(template), name, str(k), str(per),
                                    str(i)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for i, (name, k) in enumerate(people)]
    try:
        sent = [json.loads(o) for o in _finish(submitters, timeout=300)]
    finally:
        done.touch()
    (rounds,) = [json.loads(o) for o in _finish([aggregator], timeout=300)]
    with capsys.disabled():
            print(f"submitted {sum(len(s['ids']) for s in sent)} ({sum(s['refused'] for s in sent)} refused as made "
              f"against a version a round replaced), rounds {len(rounds)} (accepted "
              f"{sum(r['accepted'] for r in rounds)}), updates used {sum(len(r['updates']) for r in rounds)}")

    submitted = [u for s in sent for u in s["ids"]]
    assert len(submitted) == 4 * per and len(set(submitted)) == len(submitted)
    assert rounds, "the aggregator never found pending updates"
    with ws.db.session() as s:
        rows = {u.id: u for u in s.scalars(select(Update).where(Update.node_path == node))}
        stored_rounds = {r.id: r for r in s.scalars(select(Round).where(Round.node_path == node))}
        versions = list(s.scalars(select(Version).where(Version.node_path == node)))
    assert set(rows) == set(submitted)
    assert set(stored_rounds) == {r["round"] for r in rounds} and len(rounds) == len(stored_rounds)
    in_rounds = Counter(uid for r in stored_rounds.values() for uid in r.update_ids)
    for uid, u in rows.items():
        if u.status == "used":
            assert in_rounds[uid] == 1 and uid in stored_rounds[u.round_id].update_ids
        else:
            assert u.status == "pending" and in_rounds[uid] == 0
    assert sum(u.status == "used" for u in rows.values()) == sum(len(r["updates"]) for r in rounds)
    made = [v for v in versions if v.relation == "update"]
    assert sorted(v.id for v in made) == sorted(r["version"] for r in rounds if r["accepted"])
    assert len({v.recipe_key for v in versions}) == len(versions)
    assert ws.locks.holders() == []
    _fsck_clean(capsys, monkeypatch)
