"""locks: named locks held in the registry (per node, per curation); one version per recipe of a node

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-10 10:00:00.000000
"""
import sqlalchemy as sa
from alembic import op

from stemma.errors import StemmaError

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Builders racing without a shared lock (two homes on one registry) could publish one recipe twice; the
    # constraint cannot be added over such rows, so name them instead of failing inside the DDL.
    dup = op.get_bind().execute(sa.text(
        "SELECT node_path, recipe_key, COUNT(*) FROM versions GROUP BY node_path, recipe_key HAVING COUNT(*) > 1"
    )).fetchall()
    if dup:
        node, key, n = dup[0]
        raise StemmaError(f"{len(dup)} recipe(s) have more than one version (e.g. {node} recipe {key[:12]}: {n}); "
                           "keep one version per recipe (and point nodes at it) before upgrading")
    op.create_table('locks',
    sa.Column('name', sa.String(length=400), nullable=False),
    sa.Column('purpose', sa.String(length=200), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('token', sa.String(length=32), nullable=False),
    sa.Column('beats', sa.Integer(), nullable=False),
    sa.Column('acquired_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.create_unique_constraint('uq_version_node_recipe', ['node_path', 'recipe_key'])


def downgrade() -> None:
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.drop_constraint('uq_version_node_recipe', type_='unique')
    op.drop_table('locks')
