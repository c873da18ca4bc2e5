"""initial schema: datasets, nodes, versions, metrics

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-22 06:57:19.302613
"""
import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('datasets',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('manifest', sa.String(length=64), nullable=False),
    sa.Column('language', sa.String(length=32), nullable=True),
    sa.Column('license', sa.String(length=400), nullable=True),
    sa.Column('n_docs', sa.Integer(), nullable=False),
    sa.Column('n_train', sa.Integer(), nullable=False),
    sa.Column('n_test', sa.Integer(), nullable=False),
    sa.Column('datasheet', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name', 'seq', name='uq_dataset_name_seq')
    )
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_datasets_name'), ['name'], unique=False)

    op.create_table('nodes',
    sa.Column('path', sa.String(length=300), nullable=False),
    sa.Column('layer', sa.String(length=32), nullable=False),
    sa.Column('parent_path', sa.String(length=300), nullable=True),
    sa.Column('current_version', sa.String(length=64), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('path')
    )
    op.create_table('versions',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('node_path', sa.String(length=300), nullable=False),
    sa.Column('parent_id', sa.String(length=64), nullable=True),
    sa.Column('relation', sa.String(length=32), nullable=False),
    sa.Column('method', sa.String(length=64), nullable=False),
    sa.Column('recipe_key', sa.String(length=64), nullable=False),
    sa.Column('tokenizer', sa.String(length=64), nullable=False),
    sa.Column('params', sa.BigInteger(), nullable=False),
    sa.Column('own_params', sa.BigInteger(), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('files', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['node_path'], ['nodes.path'], ),
    sa.ForeignKeyConstraint(['parent_id'], ['versions.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_versions_node_path'), ['node_path'], unique=False)
        batch_op.create_index(batch_op.f('ix_versions_parent_id'), ['parent_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_versions_recipe_key'), ['recipe_key'], unique=False)

    op.create_table('metrics',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('version_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('dataset_id', sa.String(length=64), nullable=True),
    sa.Column('split', sa.String(length=16), nullable=True),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('details', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], ),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('version_id', 'name', 'dataset_id', 'split', name='uq_metric')
    )
    with op.batch_alter_table('metrics', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_metrics_version_id'), ['version_id'], unique=False)

    op.create_table('version_datasets',
    sa.Column('version_id', sa.String(length=64), nullable=False),
    sa.Column('dataset_id', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=32), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], ),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], ),
    sa.PrimaryKeyConstraint('version_id', 'dataset_id', 'role')
    )


def downgrade() -> None:
    op.drop_table('version_datasets')
    with op.batch_alter_table('metrics', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_metrics_version_id'))

    op.drop_table('metrics')
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_versions_recipe_key'))
        batch_op.drop_index(batch_op.f('ix_versions_parent_id'))
        batch_op.drop_index(batch_op.f('ix_versions_node_path'))

    op.drop_table('versions')
    op.drop_table('nodes')
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_datasets_name'))

    op.drop_table('datasets')
