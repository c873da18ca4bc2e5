"""A throwaway PostgreSQL cluster for the registry tests.

`pg_cluster` (one per session) runs ``initdb`` in a fresh directory under the system temporary directory and starts
the server on a Unix socket in that directory only (no TCP). When the tests run as root the cluster belongs to the
``postgres`` system user (root cannot run the server): ``initdb`` and ``pg_ctl`` run through ``runuser``. The
cluster is stopped (``pg_ctl stop -m immediate``) and its directory removed at the end of the session, whether the
tests passed or not. Without PostgreSQL (``initdb`` neither on PATH nor under /usr/lib/postgresql/*/bin) or without
the psycopg driver the tests that need it are skipped; ``./run test`` installs both.

`pg_url` is a fresh, empty database per test; `registry_url` runs a test once on SQLite and once on PostgreSQL.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

PG_USER = "stemma"
"""The cluster's superuser (clients connect as it over the socket; trust authentication)."""
_names = itertools.count()


def find_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``: PATH first, then the newest /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                  key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return Path(dirs[-1]).parent if dirs else None


class PgCluster:
    """One PostgreSQL cluster in ``root`` (``data/`` and the socket), owned by ``owner`` (None: this process's
    user)."""

    def __init__(self, bindir: Path, root: Path, owner: str | None):
        self.bindir, self.root, self.owner = bindir, root, owner
        self.data, self.log = root / "data", root / "server.log"
        self.started = False

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.owner:
            cmd = ["runuser", "-u", self.owner, "--", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=self.root)
        if r.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({r.returncode}): {r.stderr.strip()}\n{log}")
        return r

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--locale=C",
                  "--no-sync")
        # Speed over durability (the cluster dies with the session); the socket only, in our own directory.
        opts = (f"-c listen_addresses='' -k {self.root} -c fsync=off -c synchronous_commit=off "
                f"-c full_page_writes=off -c max_connections=60")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")
        self.started = True

    def stop(self) -> None:
        if self.started:
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except RuntimeError:
                pass
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql+psycopg://{PG_USER}@/{db}?host={self.root}"

    def admin(self, *statements: str) -> None:
        """Run statements outside a transaction in the maintenance database (CREATE/DROP DATABASE)."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT", poolclass=_null_pool())
        try:
            with engine.connect() as conn:
                for st in statements:
                    conn.execute(text(st))
        finally:
            engine.dispose()

    def create_database(self, template: str | None = None) -> str:
        """A new database (a copy of ``template`` when given); returns its name."""
        name = f"t{os.getpid()}_{next(_names)}"
        stmts = []
        if template:  # CREATE DATABASE ... TEMPLATE needs the template to have no sessions
            stmts.append(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{template}'")
        stmts.append(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        self.admin(*stmts)
        return name

    def drop_database(self, name: str) -> None:
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _null_pool():
    from sqlalchemy.pool import NullPool

    return NullPool


def _owner() -> str | None:
    """The user the server runs as: None when not root, else the ``postgres`` system user (created if missing)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "postgres"],
                       check=True)
    return "postgres"


@pytest.fixture(scope="session")
def pg_cluster():
    """A running throwaway PostgreSQL cluster for the whole session (skips when PostgreSQL or psycopg is absent)."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb): `./run test` installs it, or apt-get install postgresql")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: pip install 'stemma[postgres]'")
    root = Path(tempfile.mkdtemp(prefix="stemma-pg-"))  # short: a socket path is at most 107 bytes
    owner = _owner()
    if owner:
        os.chown(root, pwd.getpwnam(owner).pw_uid, pwd.getpwnam(owner).pw_gid)
    cluster = PgCluster(bindir, root, owner)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster):
    """The SQLAlchemy URL of a fresh, empty PostgreSQL database (dropped after the test)."""
    name = pg_cluster.create_database()
    yield pg_cluster.url(name)
    pg_cluster.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request, tmp_path):
    """An empty registry database: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def pg_tree(pg_cluster, tmp_path_factory):
    """The tiny GPT-2 tree built once with its registry in PostgreSQL (a database used as a template: read-only)."""
    from tests.conftest import _build_tree

    name = pg_cluster.create_database()
    return {**_build_tree(tmp_path_factory, "gpt2", url=pg_cluster.url(name)), "database": name}


@pytest.fixture
def pg_tree_copy(pg_tree, pg_cluster, tmp_path, monkeypatch):
    """A private, writable copy of the PostgreSQL tree: its home copied, its database cloned from the template."""
    from stemma.workspace import Workspace

    dst = tmp_path / "tree"
    shutil.copytree(pg_tree["dir"], dst, symlinks=True)
    name = pg_cluster.create_database(template=pg_tree["database"])
    url = pg_cluster.url(name)
    monkeypatch.setenv("STEMMA_HOME", str(dst / "home"))
    monkeypatch.setenv("STEMMA_REGISTRY_URL", url)
    ws = Workspace.open(dst / "home")
    yield {"home": dst / "home", "spec": dst / "stemma.yaml", "dir": dst, "ws": ws, "arch": "gpt2",
           "registry_url": url}
    ws.db.engine.dispose()
    pg_cluster.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_tree(request):
    """A writable copy of the tiny tree, registered in SQLite, then in PostgreSQL."""
    return request.getfixturevalue("tree_copy" if request.param == "sqlite" else "pg_tree_copy")
