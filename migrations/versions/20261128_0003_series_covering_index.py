"""series: (modality, series_date, domain) index covers filtered searches and their counts

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 08:50:00

"""
from alembic import op


# revision identifiers, used by Alembic.
revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_index('ix_series_modality_date')
        batch_op.create_index('ix_series_modality_date', ['modality', 'series_date', 'domain'],
                              unique=False)


def downgrade():
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_index('ix_series_modality_date')
        batch_op.create_index('ix_series_modality_date', ['modality', 'series_date'],
                              unique=False)
