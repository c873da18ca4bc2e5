"""Locks in the registry (`stemma.registry.locks`): one holder across processes, take-over of a holder that is gone,
on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update

from stemma.errors import StemmaError
from stemma.registry import locks
from stemma.registry.db import Database
from stemma.registry.tables import Lock

ROOT = Path(__file__).resolve().parents[1]

COUNTER = r"""
import sys, time
from pathlib import Path
from stemma.registry.db import Database
from stemma.registry.locks import Locks

url, counter, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
held = Locks(Database(url, migrate=False))
for _ in range(n):
    with held.hold("node:x", "count"):
        value = int(counter.read_text())  # read, wait, write: two holders at once would lose an increment
        time.sleep(0.01)
        counter.write_text(str(value + 1))
"""

HOLDER = r"""
import sys, time
from stemma.registry.db import Database
from stemma.registry.locks import Locks

with Locks(Database(sys.argv[1], migrate=False)).hold("node:x", "build"):
    print("held", flush=True)
    time.sleep(600)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.timeout(120)
def test_one_holder_at_a_time_across_processes(registry_url, tmp_path):
    """Three processes increment one file under one lock, read-sleep-write: no increment is lost, no row is left."""
    db = Database(registry_url)
    counter = tmp_path / "counter"
    counter.write_text("0")
    n = 8
    procs = [subprocess.Popen([sys.executable, "-c", COUNTER, registry_url, str(counter), str(n)], env=_env(),
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=100)
        assert p.returncode == 0, err[-2000:]
    assert counter.read_text() == str(3 * n)
    assert locks.Locks(db).holders() == []
    db.engine.dispose()


@pytest.mark.timeout(120)
def test_a_holder_killed_with_sigkill_is_taken_over_at_once(registry_url):
    """The holder's pid on this host is gone: the waiter takes the lock without waiting for the stale limit, and
    says from whom."""
    db = Database(registry_url)
    p = subprocess.Popen([sys.executable, "-c", HOLDER, registry_url], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        (holder,) = locks.Locks(db).holders()
        assert (holder.name, holder.purpose, holder.pid, holder.host) == ("node:x", "build", p.pid, locks.HOST)
        with pytest.raises(StemmaError, match=rf"lock node:x is held \(build by pid {p.pid} on .*gave up after 1 s"):
            with locks.Locks(db).hold("node:x", "build", timeout=1):
                pass
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    said = []
    t0 = time.monotonic()
    with locks.Locks(db).hold("node:x", "build", log=said.append):
        (holder,) = locks.Locks(db).holders()
        assert holder.pid == os.getpid()
    assert time.monotonic() - t0 < locks.STALE_S / 4
    (line,) = said
    assert line.startswith(f"lock node:x: took over from build by pid {p.pid} on {locks.HOST} since ")
    assert line.endswith(f"(its process {p.pid} on {locks.HOST} is gone)")
    assert locks.Locks(db).holders() == []
    db.engine.dispose()


@pytest.mark.timeout(60)
def test_a_lock_that_stopped_beating_is_taken_over_and_its_holder_told(registry_url, monkeypatch):
    """A holder on another host (its pid cannot be checked) whose beats stand still for the stale limit is taken
    over; a holder that finds its lock taken over raises when its block ends."""
    monkeypatch.setenv("STEMMA_LOCK_STALE_S", "1")
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.05)
    db = Database(registry_url)
    with db.session() as s:
        now = locks.utcnow()
        s.add(Lock(name="node:y", purpose="build", host="elsewhere", pid=1, token="t" * 32, beats=7, acquired_at=now,
                   heartbeat_at=now))
    said = []
    t0 = time.monotonic()
    with locks.Locks(db).hold("node:y", "aggregate", log=said.append):
        waited = time.monotonic() - t0
    assert 1 <= waited < 10
    assert said[0].startswith("waiting for lock node:y (build by pid 1 on elsewhere since ")
    assert said[1].startswith("lock node:y: took over from build by pid 1 on elsewhere")
    assert "(no heartbeat for 1 s)" in said[1] or "(no heartbeat for 2 s)" in said[1]

    entered = threading.Event()
    release = threading.Event()
    failure = []

    def hold():
        try:
            with locks.Locks(db).hold("node:y", "build"):
                entered.set()
                release.wait(30)
        except StemmaError as e:
            failure.append(str(e))

    t = threading.Thread(target=hold)
    t.start()
    assert entered.wait(30)
    with db.session() as s:  # another process takes it over (as it would after our beats stood still)
        s.execute(update(Lock).where(Lock.name == "node:y").values(token="u" * 32, host="elsewhere", pid=2))
    time.sleep(0.5)
    release.set()
    t.join(30)
    assert failure and failure[0].startswith("lock node:y was taken over while held (now held build by pid 2 on "
                                             "elsewhere")
    with db.session() as s:  # the holder that lost it released nothing but its own claim
        assert s.scalar(select(Lock.token).where(Lock.name == "node:y")) == "u" * 32
    db.engine.dispose()


def test_a_bad_stale_limit_is_refused(monkeypatch):
    monkeypatch.setenv("STEMMA_LOCK_STALE_S", "soon")
    with pytest.raises(StemmaError, match="STEMMA_LOCK_STALE_S must be a positive number of seconds, got 'soon'"):
        locks.stale_after()


def test_fsck_watches_the_beats_of_another_hosts_lock(registry_url, tmp_path, monkeypatch):
    """fsck's stale-lock report: a lock held on another host is stale when its beats stand still while fsck watches
    them, whatever its holder's clock wrote (an hour ahead here); one whose beats move is not."""
    from datetime import timedelta

    from stemma.workspace import Workspace

    monkeypatch.setenv("STEMMA_REGISTRY_URL", registry_url)
    ws = Workspace.init(tmp_path / "home")
    ahead = locks.utcnow() + timedelta(hours=1)
    with ws.db.session() as s:
        for name in ("node:still", "node:alive"):
            s.add(Lock(name=name, purpose="build", host="elsewhere", pid=1, token=name[5] * 32, beats=3,
                       acquired_at=ahead, heartbeat_at=ahead))
    beating = threading.Event()

    def beat():
        while not beating.is_set():
            with ws.db.session() as s:
                s.get(Lock, "node:alive").beats += 1
            beating.wait(0.05)

    t = threading.Thread(target=beat)
    t.start()
    try:
        report = ws.stale_locks(watch_s=0.5)
    finally:
        beating.set()
        t.join()
    assert len(report) == 1 and report[0].startswith("lock node:still: build by pid 1 on elsewhere")
    assert report[0].endswith("; its heartbeat did not move in the 0.5 s this watched it")
