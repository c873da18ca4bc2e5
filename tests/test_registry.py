from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from stemma.registry.db import Database, schema_revision
from stemma.registry.tables import Base


def test_migrations_build_exactly_the_declared_schema(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    assert schema_revision(db.engine) == "0001"


def test_upgrade_is_idempotent(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    Database(url)
    db = Database(url)
    assert schema_revision(db.engine) == "0001"


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
