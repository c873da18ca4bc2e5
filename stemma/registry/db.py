"""Opening the registry: engine, migrations, sessions."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import StemmaError

T = TypeVar("T")

_CONFLICT_STATES = {"23505", "40001", "40P01"}
"""PostgreSQL SQLSTATEs a concurrent writer causes: unique violation, serialization failure, deadlock."""


def is_conflict(e: BaseException) -> bool:
    """Whether a failed transaction lost a race with another writer (so running it again on fresh reads is right)."""
    if not isinstance(e, DBAPIError):
        return False
    orig = e.orig
    if getattr(orig, "sqlstate", None) in _CONFLICT_STATES:
        return True
    msg = str(orig)
    return "UNIQUE constraint failed" in msg or "database is locked" in msg  # SQLite


def _alembic_config(url: str) -> Config:
    here = os.path.dirname(__file__)
    cfg = Config(os.path.join(here, "alembic.ini"))
    cfg.set_main_option("script_location", os.path.join(here, "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def make_engine(url: str) -> Engine:
    kwargs = {}
    if url.startswith("sqlite"):
        # A build and a `stemma tree` may run at once; wait for the writer instead of failing at once.
        kwargs["connect_args"] = {"timeout": 30}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

    return engine


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest migration (a no-op when it is already there)."""
    cfg = _alembic_config(str(engine.url.render_as_string(hide_password=False)))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    if current == head:
        return
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        if sqlite:
            # A batch migration rebuilds a SQLite table (a copy, the rows moved, the old one dropped); with foreign
            # keys enforced, dropping a table that other rows refer to fails. Alembic's documented remedy: keys
            # off for the migration (the pragma does nothing inside a transaction, so it comes first), then every
            # reference checked once at the end.
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            # pysqlite runs DDL outside the transaction: a batch migration interrupted before this one can have
            # left its copy of a table behind, which would stop the next attempt. While the original table is
            # there the copy holds nothing else and goes; without it, the copy is all there is, and nothing is
            # touched.
            tables = {n for (n,) in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'table'")}
            for name in sorted(t for t in tables if t.startswith("_alembic_tmp_")):
                if name.removeprefix("_alembic_tmp_") not in tables:
                    raise StemmaError(f"the registry holds {name} but not {name.removeprefix('_alembic_tmp_')}: "
                                      "an upgrade was interrupted mid-table; restore registry.db from a copy")
                conn.exec_driver_sql(f'DROP TABLE "{name}"')
            conn.commit()
        try:
            with conn.begin():
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall() if sqlite else []
                if broken:
                    raise StemmaError(f"migrating the registry would break {len(broken)} reference(s), e.g. "
                                      f"{broken[0]}; nothing was changed")
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()


def schema_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


class Database:
    def __init__(self, url: str, migrate: bool = True):
        self.url = url
        try:
            self.engine = make_engine(url)
            if migrate:
                upgrade(self.engine)
        except ImportError as e:  # e.g. the PostgreSQL driver is not installed
            raise StemmaError(f"cannot open registry {url!r}: {e} (pip install 'stemma[postgres]')") from e
        self._factory = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose work is committed at the end of the block, or rolled back entirely on error."""
        s = self._factory()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def retrying(self, work: Callable[[Session], T], attempts: int = 10) -> T:
        """Run ``work(session)`` in one transaction; when it lost a race with another writer (a unique key taken
        meanwhile: a dataset's next sequence number, a node or a version registered by another process; a
        serialization failure or deadlock) the transaction is rolled back and ``work`` runs again on fresh reads."""
        for attempt in range(attempts):
            try:
                with self.session() as s:
                    return work(s)
            except DBAPIError as e:
                if attempt == attempts - 1 or not is_conflict(e):
                    raise
            time.sleep(random.uniform(0, 0.02 * (attempt + 1)))
        raise AssertionError("unreachable")
