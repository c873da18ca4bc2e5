"""Named locks in the registry: one holder at a time per node (or per curation), across processes and machines.

A lock is a row of ``locks``, claimed by INSERT: the name is the primary key, so of two claims one wins, on SQLite
and on PostgreSQL alike. The row names its owner (host, pid) and a random token for this claim; while the block
runs, a thread increments its ``beats`` every `HEARTBEAT_S` seconds. A waiter polls, and takes the lock over when
its owner is gone:

- the owner ran on this host and its pid is no longer running (a builder killed with ``kill -9``): at once;
- its beats have not moved for ``stale_s`` seconds of the waiter's own clock (a host that died, a process that
  hangs): no two machines' clocks are ever compared.

A take-over is ``UPDATE ... WHERE token = <the token the waiter saw>``, so of two waiters taking over one lock only
one succeeds; it says so through ``log``. A holder whose lock was taken over (it stopped beating long enough) learns
it at its next beat and `hold` raises when its block ends, naming the new owner.

Locks are held in a fixed order (`hold` sorts the names it takes at once; a build takes nodes parents first, one
at a time), so two holders never wait for each other.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.exc import DBAPIError

from ..errors import StemmaError
from .db import Database, is_conflict
from .tables import Lock, utcnow

HEARTBEAT_S = 5.0
"""How often a holder beats."""
STALE_S = 60.0
"""How long a lock's beats may stand still before a waiter takes it over (``STEMMA_LOCK_STALE_S``)."""
POLL_S = 0.2
"""How often a waiter looks again."""
HOST = socket.gethostname()


def stale_after() -> float:
    """`STALE_S`, or ``STEMMA_LOCK_STALE_S`` when set (a positive number of seconds)."""
    raw = os.environ.get("STEMMA_LOCK_STALE_S")
    if raw is None:
        return STALE_S
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise StemmaError(f"STEMMA_LOCK_STALE_S must be a positive number of seconds, got {raw!r}")
    return value


def pid_running(pid: int) -> bool:
    """Whether a process with this pid runs on this host (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as a waiter or `stemma fsck` describes it."""

    name: str
    purpose: str
    host: str
    pid: int
    token: str
    beats: int
    acquired_at: object
    heartbeat_at: object

    @property
    def who(self) -> str:
        return f"{self.purpose} by pid {self.pid} on {self.host} since {self.acquired_at:%Y-%m-%d %H:%M:%S}"

    def dead_here(self) -> bool:
        """Its owner ran on this host and is gone."""
        return self.host == HOST and not pid_running(self.pid)


def _holder(row: Lock) -> Holder:
    return Holder(row.name, row.purpose, row.host, row.pid, row.token, row.beats, row.acquired_at, row.heartbeat_at)


class Locks:
    """The registry's named locks."""

    def __init__(self, db: Database):
        self.db = db

    def holders(self) -> list[Holder]:
        with self.db.session() as s:
            return [_holder(r) for r in s.scalars(select(Lock).order_by(Lock.name))]

    @contextmanager
    def hold(self, names: str | Iterable[str], purpose: str, log: Callable[[str], None] | None = None,
             timeout: float | None = None) -> Iterator[None]:
        """Hold every lock in ``names`` for the block (taken in sorted order, released in reverse), waiting for
        their holders; ``timeout`` seconds without getting them raise `StemmaError` naming the holder."""
        names = sorted({names} if isinstance(names, str) else set(names))
        log = log or (lambda _msg: None)
        token = secrets.token_hex(16)
        taken: list[str] = []
        lost: dict[str, str] = {}
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(taken, token, lost, stop), daemon=True,
                                name="stemma-lock-beat")
        try:
            beat.start()  # before the first lock: one held while waiting for the next must not look stale
            for name in names:
                self._acquire(name, purpose, token, log, timeout)
                taken.append(name)
            yield
        finally:
            stop.set()
            if beat.is_alive():
                beat.join()
            for name in reversed(taken):
                self._release(name, token)
        if lost:
            name, why = next(iter(lost.items()))
            raise StemmaError(f"lock {name} was taken over while held ({why}): another process may have done the "
                              "same work; the registry keeps one version per recipe, run `stemma fsck`")

    # ------------------------------------------------------------------ steps
    def _acquire(self, name: str, purpose: str, token: str, log: Callable[[str], None], timeout: float | None):
        limit = stale_after()
        t0 = time.monotonic()
        seen: tuple[str, int] | None = None  # the holder's (token, beats) as last seen, and since when
        seen_at = t0
        told = False
        while True:
            if self._claim(name, purpose, token):
                return
            with self.db.session() as s:
                row = s.get(Lock, name)
                holder = _holder(row) if row is not None else None
            if holder is None:  # released between our claim and our look
                continue
            now = time.monotonic()
            if seen != (holder.token, holder.beats):
                seen, seen_at = (holder.token, holder.beats), now
            why = None
            if holder.dead_here():
                why = f"its process {holder.pid} on {holder.host} is gone"
            elif now - seen_at > limit:
                why = f"no heartbeat for {now - seen_at:.0f} s"
            if why is not None:
                if self._take_over(name, purpose, holder.token, token):
                    log(f"lock {name}: took over from {holder.who} ({why})")
                    return
                continue
            if timeout is not None and now - t0 > timeout:
                raise StemmaError(f"lock {name} is held ({holder.who}); gave up after {timeout:.0f} s")
            if not told:
                log(f"waiting for lock {name} ({holder.who})")
                told = True
            time.sleep(POLL_S)

    def _claim(self, name: str, purpose: str, token: str) -> bool:
        try:
            with self.db.session() as s:
                now = utcnow()
                s.add(Lock(name=name, purpose=purpose, host=HOST, pid=os.getpid(), token=token, beats=0,
                           acquired_at=now, heartbeat_at=now))
                s.flush()
        except DBAPIError as e:
            if is_conflict(e):
                return False
            raise
        return True

    def _take_over(self, name: str, purpose: str, old_token: str, token: str) -> bool:
        now = utcnow()
        with self.db.session() as s:
            done = s.execute(update(Lock).where(Lock.name == name, Lock.token == old_token).values(
                purpose=purpose, host=HOST, pid=os.getpid(), token=token, beats=0, acquired_at=now,
                heartbeat_at=now))
            return done.rowcount == 1

    def _release(self, name: str, token: str) -> None:
        with self.db.session() as s:
            s.execute(delete(Lock).where(Lock.name == name, Lock.token == token))

    def _beat(self, names: list[str], token: str, lost: dict[str, str], stop: threading.Event) -> None:
        """Every `HEARTBEAT_S`: one beat per held lock; a lock whose row no longer carries our token was taken over."""
        while not stop.wait(HEARTBEAT_S):
            for name in list(names):
                if name in lost:
                    continue
                try:
                    with self.db.session() as s:
                        done = s.execute(update(Lock).where(Lock.name == name, Lock.token == token).values(
                            beats=Lock.beats + 1, heartbeat_at=utcnow()))
                        if done.rowcount == 0:
                            row = s.get(Lock, name)
                            lost[name] = f"now held {_holder(row).who}" if row is not None else "released by another"
                except DBAPIError:  # the database is unreachable for a moment: beat again at the next tick
                    pass
