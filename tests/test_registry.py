from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from stemma.registry.db import Database, _alembic_config, schema_revision
from stemma.registry.tables import Base

HEAD = "0005"


def test_migrations_build_exactly_the_declared_schema(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    assert schema_revision(db.engine) == HEAD


def test_upgrade_is_idempotent(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    Database(url)
    db = Database(url)
    assert schema_revision(db.engine) == HEAD


def test_a_failed_transaction_leaves_nothing(tmp_path):
    import pytest

    from stemma.registry.tables import Node

    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    with pytest.raises(RuntimeError):
        with db.session() as s:
            s.add(Node(path="x", layer="master"))
            s.flush()
            raise RuntimeError("crash mid-transaction")
    with db.session() as s:
        assert s.get(Node, "x") is None


def test_a_registry_at_an_older_revision_is_upgraded_in_place(tmp_path):
    """A home made before the updates tables existed opens with its rows intact and the new tables added."""
    from alembic import command
    from sqlalchemy import create_engine, text

    from stemma.registry.tables import Contributor, Node

    url = f"sqlite:///{tmp_path / 'r.db'}"
    command.upgrade(_alembic_config(url), "0001")
    with create_engine(url).begin() as conn:
        conn.execute(text("INSERT INTO nodes (path, layer, updated_at) VALUES ('master', 'master', '2026-01-01')"))
    db = Database(url)
    assert schema_revision(db.engine) == HEAD
    with db.session() as s:
        assert s.get(Node, "master").gate is None
        s.add(Contributor(node_path="master", name="a", public_key="0" * 64))
