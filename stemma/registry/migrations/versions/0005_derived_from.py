"""versions.derived_from: the version a rebase started from, followed by risk flags

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 16:00:00.000000
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('derived_from', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_versions_derived_from'), ['derived_from'], unique=False)
        batch_op.create_foreign_key('fk_versions_derived_from', 'versions', ['derived_from'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.drop_constraint('fk_versions_derived_from', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_versions_derived_from'))
        batch_op.drop_column('derived_from')
