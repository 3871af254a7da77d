"""dicom_nodes: the DICOM nodes the listener admits (dicom/net.py, issue 14)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 16:00:00

"""
import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        'dicom_nodes',
        sa.Column('ae_title', sa.String(length=16), nullable=False),
        sa.Column('host', sa.String(length=255), nullable=False),
        sa.Column('port', sa.Integer(), nullable=True),
        sa.Column('domain', sa.String(length=128), nullable=False),
        sa.Column('allow', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('ae_title'),
    )
    with op.batch_alter_table('dicom_nodes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dicom_nodes_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_dicom_nodes_updated_at'), ['updated_at'], unique=False)


def downgrade():
    with op.batch_alter_table('dicom_nodes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dicom_nodes_updated_at'))
        batch_op.drop_index(batch_op.f('ix_dicom_nodes_created_at'))
    op.drop_table('dicom_nodes')
