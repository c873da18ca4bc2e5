"""updates: contributors, updates, rounds, node gates

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 20:50:30.181358
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('contributors',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('node_path', sa.String(length=300), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('public_key', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['node_path'], ['nodes.path'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('node_path', 'name', name='uq_contributor_node_name')
    )
    with op.batch_alter_table('contributors', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_contributors_node_path'), ['node_path'], unique=False)

    op.create_table('rounds',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('node_path', sa.String(length=300), nullable=False),
    sa.Column('parent_id', sa.String(length=64), nullable=False),
    sa.Column('source_round', sa.String(length=64), nullable=True),
    sa.Column('strategy', sa.String(length=32), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('update_ids', sa.JSON(), nullable=False),
    sa.Column('selected', sa.JSON(), nullable=False),
    sa.Column('delta', sa.String(length=64), nullable=False),
    sa.Column('accepted', sa.Boolean(), nullable=False),
    sa.Column('reasons', sa.JSON(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('version_id', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['node_path'], ['nodes.path'], ),
    sa.ForeignKeyConstraint(['parent_id'], ['versions.id'], ),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('rounds', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rounds_node_path'), ['node_path'], unique=False)

    op.create_table('updates',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('node_path', sa.String(length=300), nullable=False),
    sa.Column('parent_id', sa.String(length=64), nullable=False),
    sa.Column('contributor_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('n_examples', sa.Integer(), nullable=False),
    sa.Column('n_tokens', sa.BigInteger(), nullable=False),
    sa.Column('header', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('round_id', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['contributor_id'], ['contributors.id'], ),
    sa.ForeignKeyConstraint(['node_path'], ['nodes.path'], ),
    sa.ForeignKeyConstraint(['parent_id'], ['versions.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('updates', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_updates_node_path'), ['node_path'], unique=False)
        batch_op.create_index(batch_op.f('ix_updates_parent_id'), ['parent_id'], unique=False)

    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('gate', sa.JSON(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.drop_column('gate')

    with op.batch_alter_table('updates', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_updates_parent_id'))
        batch_op.drop_index(batch_op.f('ix_updates_node_path'))

    op.drop_table('updates')
    with op.batch_alter_table('rounds', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rounds_node_path'))

    op.drop_table('rounds')
    with op.batch_alter_table('contributors', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_contributors_node_path'))

    op.drop_table('contributors')
