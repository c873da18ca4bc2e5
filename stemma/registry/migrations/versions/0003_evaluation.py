"""evaluation: node tasks and release gates

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 10:00:00.000000
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tasks', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('release_gate', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.drop_column('release_gate')
        batch_op.drop_column('tasks')
