from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from stemma.registry.db import Database, _alembic_config, schema_revision
from stemma.registry.tables import Base

HEAD = "0005"


def test_migrations_build_exactly_the_declared_schema(registry_url):
    """On SQLite and on PostgreSQL: types, lengths, indexes, constraints and foreign keys as declared."""
    db = Database(registry_url)
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    assert schema_revision(db.engine) == HEAD
    db.engine.dispose()


def test_upgrade_is_idempotent(registry_url):
    Database(registry_url).engine.dispose()
    db = Database(registry_url)
    assert schema_revision(db.engine) == HEAD
    db.engine.dispose()


def test_a_failed_transaction_leaves_nothing(registry_url):
    import pytest

    from stemma.registry.tables import Node

    db = Database(registry_url)
    with pytest.raises(RuntimeError):
        with db.session() as s:
            s.add(Node(path="x", layer="master"))
            s.flush()
            raise RuntimeError("crash mid-transaction")
    with db.session() as s:
        assert s.get(Node, "x") is None
    db.engine.dispose()


def test_a_registry_at_an_older_revision_is_upgraded_in_place(registry_url):
    """A home made before the updates tables existed opens with its rows intact and the new tables added."""
    from alembic import command
    from sqlalchemy import create_engine, text

    from stemma.registry.tables import Contributor, Node

    url = registry_url
    command.upgrade(_alembic_config(url), "0001")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO nodes (path, layer, updated_at) VALUES ('master', 'master', '2026-01-01')"))
    engine.dispose()
    db = Database(url)
    assert schema_revision(db.engine) == HEAD
    with db.session() as s:
        assert s.get(Node, "master").gate is None
        s.add(Contributor(node_path="master", name="a", public_key="0" * 64))
    db.engine.dispose()
