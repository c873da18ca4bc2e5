from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from stemma.registry.db import Database, _alembic_config, schema_revision
from stemma.registry.tables import Base

HEAD = "0006"


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


def test_a_populated_registry_of_an_older_schema_upgrades_keeping_its_rows(registry_url):
    """Rows that reference the tables a migration rebuilds (versions, contributors) survive the upgrade."""
    from alembic import command
    from sqlalchemy import text

    from stemma.registry.db import make_engine

    engine = make_engine(registry_url)
    cfg = _alembic_config(registry_url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
    now = "2026-01-01 00:00:00"
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO nodes (path, layer, updated_at) VALUES ('m', 'master', :t)"), {"t": now})
        conn.execute(text("INSERT INTO datasets (id, name, seq, manifest, n_docs, n_train, n_test, datasheet, "
                          "created_at) VALUES ('d', 'd', 1, 'd', 1, 1, 0, '{}', :t)"), {"t": now})
        for vid, parent in (("v1", None), ("v2", "v1")):
            conn.execute(text("INSERT INTO versions (id, node_path, parent_id, relation, method, recipe_key, "
                              "tokenizer, params, own_params, bytes, files, created_at) VALUES (:v, 'm', :p, "
                              "'pretrain', 'pretrain', :k, 't', 1, 1, 1, '{}', :t)"),
                         {"v": vid, "p": parent, "k": f"k-{vid}", "t": now})
        conn.execute(text("INSERT INTO version_datasets (version_id, dataset_id, role) VALUES ('v2', 'd', 'train')"))
        conn.execute(text("INSERT INTO metrics (version_id, name, value, created_at) VALUES ('v2', 'ppl', 3.0, :t)"),
                     {"t": now})
        conn.execute(text("INSERT INTO contributors (node_path, name, public_key, created_at) VALUES "
                          "('m', 'alice', 'ab', :t)"), {"t": now})
        conn.execute(text("INSERT INTO updates (id, node_path, parent_id, contributor_id, kind, n_examples, n_tokens, "
                          "header, status, created_at) VALUES ('u', 'm', 'v2', 1, 'lora', 1, 1, '{}', 'pending', :t)"),
                     {"t": now})
    engine.dispose()
    db = Database(registry_url)
    assert schema_revision(db.engine) == HEAD
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT id, parent_id, derived_from FROM versions ORDER BY id")).all() == [
            ("v1", None, None), ("v2", "v1", None)]
        assert conn.execute(text("SELECT count(*) FROM metrics")).scalar() == 1
        assert conn.execute(text("SELECT name, revoked_at FROM contributors")).all() == [("alice", None)]
        assert conn.execute(text("SELECT contributor_id FROM updates")).scalar() == 1
    db.engine.dispose()


def test_a_registry_with_two_versions_of_one_recipe_is_not_upgraded_past_them(registry_url):
    """Migration 0006 makes one version per recipe of a node a constraint: a registry that already breaks it is
    named and left as it was, not half-migrated."""
    import pytest
    from alembic import command
    from sqlalchemy import text

    from stemma.errors import StemmaError
    from stemma.registry.db import make_engine

    engine = make_engine(registry_url)
    cfg = _alembic_config(registry_url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0005")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO nodes (path, layer, updated_at) VALUES ('m', 'master', '2026-01-01')"))
        for vid in ("v1", "v2"):
            conn.execute(text("INSERT INTO versions (id, node_path, relation, method, recipe_key, tokenizer, params, "
                              "own_params, bytes, files, created_at) VALUES (:v, 'm', 'pretrain', 'pretrain', "
                              "'same', 't', 1, 1, 1, '{}', '2026-01-01')"), {"v": vid})
    engine.dispose()
    with pytest.raises(StemmaError, match=r"1 recipe\(s\) have more than one version \(e.g. m recipe same: 2\)"):
        Database(registry_url)
    engine = make_engine(registry_url)
    assert schema_revision(engine) == "0005"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM versions")).scalar() == 2
    engine.dispose()


def test_the_copy_an_interrupted_sqlite_migration_left_is_cleared(tmp_path):
    from alembic import command
    from sqlalchemy import text

    from stemma.registry.db import make_engine

    url = f"sqlite:///{tmp_path / 'r.db'}"
    engine = make_engine(url)
    cfg = _alembic_config(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
        conn.execute(text("CREATE TABLE _alembic_tmp_versions (id VARCHAR(64))"))  # as a failed batch step leaves it
    engine.dispose()
    db = Database(url)
    assert schema_revision(db.engine) == HEAD
    db.engine.dispose()
